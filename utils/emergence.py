"""Emergence as a number: how well the CLS attention heads of a ViT's last block segment the objects.

The protocol is DINO's (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021, Fig. 4 and its table: Jaccard similarity between the ground truth and the masks obtained by
thresholding the last block's CLS self-attention to keep 60% of its mass, best head, PASCAL VOC12 val;
ViT-S/16: random weights 22.0, supervised 27.3, DINO 45.9). DINO's repository has the thresholding
(``visualize_attention.py``) but not the evaluation; we follow the public re-implementation that later
papers' code bases copy (functions ``get_attention_masks`` and ``get_per_sample_jaccard``: VOC12 val through
torchvision's ``VOCSegmentation``, image and mask resized to a square):

1. per image and head, the CLS→patch attention map is thresholded to the smallest set of patches holding
   ``keep`` (0.6) of its mass (:func:`utils.attention.mass_threshold_masks`, DINO's ``th_attn``);
2. each head's mask is upsampled to the ground-truth resolution with nearest neighbours (every patch a
   solid block);
3. for every ground-truth object, the Jaccard index (IoU) with every head's mask; the object's score is
   that of its best head;
4. an image's score is the mean over its objects; the final number the mean over images.

Deliberate differences from that re-implementation:

* objects are the instances of VOC's ``SegmentationObject`` masks when the caller has them (ids 1..k),
  one object per class present in ``SegmentationClass`` otherwise (what the re-implementation always
  uses; two people then form one "object"). The functions here take either: a label map whose non-zero,
  non-void ids are the objects;
* void pixels (255, the object borders) are left out of both intersection and union. (The
  re-implementation means to do the same, but its test ``cur_mask != 255`` is on a boolean mask and is
  always true.) Images without any object are left out of the mean;
* the ground truth keeps its own resolution (the head masks are upsampled to it) instead of being resized
  to the network's square input.

With instance masks an image holding several objects of one class scores lower than with class masks
(each instance needs a head of its own), so compare numbers computed from the same kind of mask.

Scores are fractions in [0, 1]: DINO's 45.9 reads 0.459 here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.attention import mass_threshold_masks

__all__ = ["VOID", "EmergenceScore", "best_head_jaccard", "emergence_jaccard", "image_jaccard", "jaccard_per_head",
           "object_masks", "upsample_masks"]

VOID = 255  # VOC's "difficult / border" label in both SegmentationClass and SegmentationObject


def object_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The objects of a label map and its valid pixels.

    ``labels``: (h, w) integer ids, 0 background, ``VOID`` (255) ignored, every other id one object
    (instance ids of ``SegmentationObject`` or class ids of ``SegmentationClass``). Returns
    ``objects`` (K, h, w) bool, one mask per id in ascending order (K may be 0), and ``valid`` (h, w) bool.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be an (h, w) map, got shape {tuple(labels.shape)}")
    ids = torch.unique(labels)
    ids = ids[(ids != 0) & (ids != VOID)]
    return labels[None] == ids[:, None, None], labels != VOID


def upsample_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., h, w) bool patch-grid masks → (..., H, W) by nearest neighbours (PyTorch's ``nearest``: target
    pixel i takes source floor(i · h / H)), any size, not only multiples of the grid."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).to(torch.uint8)
    up = F.interpolate(flat, size=tuple(size), mode="nearest")
    return up.reshape(*lead, *up.shape[-2:]).bool()


def jaccard_per_head(head_masks: Tensor, objects: Tensor, valid: Tensor) -> Tensor:
    """Jaccard index (IoU) of every object with every head's mask, counting valid pixels only: (K, H).

    ``head_masks`` (H, h, w) bool, ``objects`` (K, h, w) bool, ``valid`` (h, w) bool, all at the same
    resolution. Intersections of all pairs come from one matrix product of the flattened masks (exact:
    float64 counts). A pair whose union is empty (an empty object and an empty head mask) scores 0.
    """
    if head_masks.shape[-2:] != objects.shape[-2:] or valid.shape != objects.shape[-2:]:
        raise ValueError(f"head masks {tuple(head_masks.shape)}, objects {tuple(objects.shape)} and valid "
                         f"{tuple(valid.shape)} must share their last two dims (upsample the head masks first)")
    heads = (head_masks & valid).flatten(1).double()  # (H, P)
    objs = (objects & valid).flatten(1).double()  # (K, P)
    inter = objs @ heads.T  # (K, H)
    union = objs.sum(1, keepdim=True) + heads.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter)).float()


def best_head_jaccard(jaccard: Tensor) -> Tensor:
    """An image's score from its (K, H) matrix: each object's best head, averaged over objects (0-dim)."""
    if jaccard.shape[0] == 0:
        raise ValueError("an image without objects has no score")
    return jaccard.max(dim=1).values.mean()


def image_jaccard(head_masks: Tensor, labels: Tensor) -> Tensor:
    """(K, H) Jaccard matrix of one image: patch-grid head masks (H, gh, gw) upsampled to the label map."""
    objects, valid = object_masks(labels)
    return jaccard_per_head(upsample_masks(head_masks, tuple(labels.shape)), objects, valid)


@dataclass
class EmergenceScore:
    jaccard: float
    """Best head per object, mean over objects, mean over images (NaN when no image has an object)."""
    per_head: Tensor
    """(H,) each head's own score: its Jaccard per object, mean over objects, mean over images."""
    images: int
    """Images that contributed (those with at least one object)."""
    objects: int
    """Objects scored, over all those images."""


def emergence_jaccard(attn: Tensor, labels: Sequence[Tensor], keep: float = 0.6) -> EmergenceScore:
    """DINO's emergence Jaccard of a batch (see the module docstring).

    ``attn``: (B, H, gh, gw) CLS→patch attention (:func:`utils.attention.cls_attention`, any non-negative
    maps); ``labels``: B label maps (h_i, w_i), each at its own resolution (ids as in :func:`object_masks`).
    """
    if attn.ndim != 4 or attn.shape[0] != len(labels):
        raise ValueError(f"attn must be (B, heads, h, w) with one label map per image; got {tuple(attn.shape)} "
                         f"and {len(labels)} label maps")
    masks = mass_threshold_masks(attn.detach().cpu(), keep)
    best, per_head, objects = [], [], 0
    for head_masks, label_map in zip(masks, labels):
        jaccard = image_jaccard(head_masks, label_map.cpu())
        if jaccard.shape[0] == 0:
            continue
        best.append(best_head_jaccard(jaccard))
        per_head.append(jaccard.mean(dim=0))
        objects += jaccard.shape[0]
    if not best:
        return EmergenceScore(float("nan"), torch.full((attn.shape[1],), float("nan")), 0, 0)
    return EmergenceScore(float(torch.stack(best).mean()), torch.stack(per_head).mean(dim=0), len(best), objects)
