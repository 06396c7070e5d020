"""Emergence as a number: how well the CLS-attention heads of a ViT's last block segment the objects.

DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021) reports the
Jaccard similarity between the ground truth of PASCAL VOC12 val and masks that keep 60% of the mass of
the last block's CLS self-attention, best head: ViT-S/16 45.9 (DINO), 27.3 (supervised), 22.0 (random).
DINO's repository has the thresholding (``visualize_attention.py``) but not the evaluation. The public
evaluation code later work uses to compare with those numbers is Naseer et al.'s ("Intriguing Properties
of Vision Transformers", NeurIPS 2021: ``evaluate_segmentation.py``, functions ``get_attention_masks`` and
``get_per_sample_jaccard``). Two protocols, named, are implemented here:

``dino`` — that public code, step by step (the default: numbers on DINO's scale):

1. input: torchvision's ``VOCSegmentation`` val split; image and ``SegmentationClass`` mask both resized
   to 512 × 512 with PIL (bilinear for the image, nearest for the palette mask, which PIL forces),
   ``ToTensor`` and ImageNet normalisation (see :func:`dino_preprocess`); the ViT's position embedding
   resized to the 32 × 32 (patch 16) grid by bicubic interpolation with a scale factor, no antialiasing
   (its ``forward_selfattention``; see :func:`dino_position_embedding`);
2. per head, the CLS→patch attention sorted ascending, normalised to sum 1, cumulated, and the patches
   whose cumulative mass exceeds ``1 − keep`` kept (:func:`dino_threshold_masks`);
3. each head's mask upsampled by nearest neighbours to the mask's resolution (every patch a solid block);
4. for every *class* present in the mask (ids other than 0 and 255): intersection and union with every
   head's mask, where the union counts the void pixels (255) too — the code's ``(cur_mask != 255)`` test
   is on a boolean mask and never excludes anything; the class's score is its best head's Jaccard;
5. an image's score is the mean over its classes, the final number the mean over images.

An image whose mask holds no class (background and void only) has no score; the reference code would
divide by zero there (VOC12 val has none), here it is left out and counted in
:attr:`EmergenceScore.skipped`. Numerical ties at the threshold are broken by a stable sort (the
reference's CUDA sort is not stable): only exactly equal attention values can be affected.

DINO's paper keeps 60% of the mass (``keep=0.6``); the reference repository's scripts pass
``--threshold 0.9`` — give ``keep`` explicitly when comparing with numbers computed that way.

``strict`` — our stricter variant (the project's first protocol; the input images are prepared as for
``dino``, at ``--callbacks.emergence_img_size``):

* objects are the instances of ``SegmentationObject`` (two people are two objects, each needing a head of
  its own) instead of the classes of ``SegmentationClass``;
* void pixels are left out of both intersection and union;
* masks stay at their own resolution; the threshold is :func:`analysis.attention.mass_threshold_masks`
  (the same mass criterion, in float64, ties to the patch that comes first).

``strict`` scores are lower than ``dino`` ones on the same maps (voids and split instances can only lower
an IoU): compare numbers of one protocol only. Scores are fractions in [0, 1]: DINO's 45.9 reads 0.459.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.attention import mass_threshold_masks
from datamodules.errors import DataError

__all__ = ["DINO_IMG_SIZE", "PROTOCOLS", "VOID", "EmergenceScore", "best_head_jaccard", "dino_position_embedding",
           "dino_preprocess", "dino_threshold_masks", "emergence_jaccard", "image_jaccard", "jaccard_per_head",
           "label_folders", "normalize", "object_masks", "per_image_jaccard", "summarize", "upsample_masks"]

VOID = 255  # VOC's "difficult / border" label in both SegmentationClass and SegmentationObject
PROTOCOLS = ("dino", "strict")
DINO_IMG_SIZE = 512  # the reference code's transforms.Resize((512, 512)) of image and mask
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown emergence Jaccard protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def label_folders(protocol: str) -> tuple[str, ...]:
    """The VOC mask folders a protocol reads, in order of preference: ``dino`` the class masks only (as the
    reference), ``strict`` the instance masks, else the class masks."""
    check_protocol(protocol)
    return ("SegmentationClass",) if protocol == "dino" else ("SegmentationObject", "SegmentationClass")


# -- masks --------------------------------------------------------------------------------------------------
def dino_threshold_masks(attn: Tensor, keep: float = 0.6) -> Tensor:
    """The reference code's ``th_attn``: per map (last two dims), sort the values ascending, divide by their
    sum, cumulate, and keep the patches whose cumulative mass is ``> 1 - keep``; float32 arithmetic as the
    reference (a stable sort: equal values keep row-major order). Bool tensor of ``attn``'s shape."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be a fraction in [0, 1], got {keep}")
    if attn.ndim < 2:
        raise ValueError(f"attn must have at least 2 dims (..., H, W), got shape {tuple(attn.shape)}")
    flat = attn.detach().float().reshape(*attn.shape[:-2], -1)
    values, order = torch.sort(flat, dim=-1, stable=True)
    values = values / values.sum(dim=-1, keepdim=True)
    kept_sorted = values.cumsum(dim=-1) > (1 - keep)
    mask = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return mask.reshape(attn.shape)


def upsample_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., h, w) bool patch-grid masks → (..., H, W) by nearest neighbours (PyTorch's ``nearest``: target
    pixel i takes source floor(i · h / H)), any size; for H = h·p it is the reference's
    ``interpolate(scale_factor=p, mode="nearest")``."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).to(torch.uint8)
    up = F.interpolate(flat, size=tuple(size), mode="nearest")
    return up.reshape(*lead, *up.shape[-2:]).bool()


def object_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The objects of a label map and its non-void pixels.

    ``labels``: (h, w) integer ids, 0 background, ``VOID`` (255), every other id one object (instance ids of
    ``SegmentationObject`` or class ids of ``SegmentationClass``). Returns ``objects`` (K, h, w) bool, one
    mask per id in ascending order (K may be 0), and ``valid`` (h, w) bool (``labels != VOID``).
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be an (h, w) map, got shape {tuple(labels.shape)}")
    ids = torch.unique(labels)
    ids = ids[(ids != 0) & (ids != VOID)]
    return labels[None] == ids[:, None, None], labels != VOID


# -- Jaccard ------------------------------------------------------------------------------------------------
def jaccard_per_head(head_masks: Tensor, objects: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Jaccard index (IoU) of every object with every head's mask: (K, H).

    ``head_masks`` (H, h, w) bool, ``objects`` (K, h, w) bool, ``valid`` (h, w) bool or None, all at the
    same resolution. With ``valid``, pixels outside it count in neither intersection nor union (``strict``);
    without, every pixel counts (``dino``: void pixels covered by a head's mask enlarge the union).
    Intersections of all pairs come from one matrix product of the flattened masks (exact: float64 counts).
    A pair whose union is empty scores 0.
    """
    if head_masks.shape[-2:] != objects.shape[-2:] or (valid is not None and valid.shape != objects.shape[-2:]):
        raise ValueError(f"head masks {tuple(head_masks.shape)}, objects {tuple(objects.shape)} and valid "
                         f"{None if valid is None else tuple(valid.shape)} must share their last two dims "
                         "(upsample the head masks first)")
    if valid is not None:
        head_masks, objects = head_masks & valid, objects & valid
    heads = head_masks.flatten(1).double()  # (H, P)
    objs = objects.flatten(1).double()  # (K, P)
    inter = objs @ heads.T  # (K, H)
    union = objs.sum(1, keepdim=True) + heads.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter)).float()


def best_head_jaccard(jaccard: Tensor) -> Tensor:
    """An image's score from its (K, H) matrix: each object's best head, averaged over objects (0-dim)."""
    if jaccard.shape[0] == 0:
        raise ValueError("an image without objects has no score")
    return jaccard.max(dim=1).values.mean()


def image_jaccard(head_masks: Tensor, labels: Tensor, protocol: str = "dino") -> Tensor:
    """(K, H) Jaccard matrix of one image: patch-grid head masks (H, gh, gw) upsampled to the label map,
    objects = the label map's ids other than 0 and 255, void counted in the union (``dino``) or not
    (``strict``)."""
    check_protocol(protocol)
    objects, valid = object_masks(labels)
    return jaccard_per_head(upsample_masks(head_masks, tuple(labels.shape)), objects,
                            valid if protocol == "strict" else None)


@dataclass
class EmergenceScore:
    jaccard: float
    """Best head per object, mean over an image's objects, mean over images (NaN when no image scores)."""
    per_head: Tensor
    """(H,) each head's own score: its Jaccard per object, mean over objects, mean over images."""
    images: int
    """Images that contributed (those with at least one object)."""
    objects: int
    """Objects (classes for ``dino``, instances for ``strict``) scored, over all those images."""
    skipped: int = 0
    """Images left out because their mask holds no object (background and void only)."""


def per_image_jaccard(attn: Tensor, labels: Sequence[Tensor], keep: float = 0.6,
                      protocol: str = "dino") -> list[Optional[Tensor]]:
    """One (K, H) Jaccard matrix per image (None for an image without objects); see :func:`emergence_jaccard`.
    :func:`summarize` turns any number of these (e.g. collected chunk by chunk) into the score."""
    check_protocol(protocol)
    if attn.ndim != 4 or attn.shape[0] != len(labels):
        raise ValueError(f"attentions must be (B, heads, h, w) with one label map per image; got "
                         f"{tuple(attn.shape)} and {len(labels)} label maps")
    threshold = dino_threshold_masks if protocol == "dino" else mass_threshold_masks
    masks = threshold(attn.detach().cpu(), keep)
    out: list[Optional[Tensor]] = []
    for head_masks, label_map in zip(masks, labels):
        matrix = image_jaccard(head_masks, label_map.cpu(), protocol)
        out.append(matrix if matrix.shape[0] else None)
    return out


def summarize(matrices: Sequence[Optional[Tensor]], num_heads: int) -> EmergenceScore:
    """The score of per-image (K, H) Jaccard matrices (None = an image without objects, left out)."""
    scored = [m for m in matrices if m is not None]
    skipped = len(matrices) - len(scored)
    if not scored:
        return EmergenceScore(float("nan"), torch.full((num_heads,), float("nan")), 0, 0, skipped)
    best = torch.stack([best_head_jaccard(m) for m in scored]).double().mean()
    per_head = torch.stack([m.double().mean(dim=0) for m in scored]).mean(dim=0).float()
    return EmergenceScore(float(best), per_head, len(scored), sum(m.shape[0] for m in scored), skipped)


def emergence_jaccard(attentions: Tensor, labels: Sequence[Tensor], keep: float = 0.6,
                      protocol: str = "dino") -> EmergenceScore:
    """The emergence Jaccard of a batch under ``protocol`` (``dino`` or ``strict``, see the module docstring).

    ``attentions``: (B, heads, h, w) CLS→patch attention (:func:`analysis.attention.cls_attention`, any
    non-negative maps); ``labels``: B integer label maps (H_i, W_i), 0 background, 255 void, other ids the
    objects — ``SegmentationClass`` classes for ``dino`` (resized with the image by :func:`dino_preprocess`),
    ``SegmentationObject`` instances at their own resolution for ``strict``.
    """
    return summarize(per_image_jaccard(attentions, labels, keep, protocol), attentions.shape[1])


# -- the reference's input preprocessing -------------------------------------------------------------------
def dino_preprocess(image_path: str | Path, mask_path: str | Path, size: int = DINO_IMG_SIZE) -> tuple[Tensor, Tensor]:
    """Image and class mask as the reference code feeds them: ``VOCSegmentation`` opens both with PIL (the
    image converted to RGB), ``transforms.Resize((size, size))`` resizes them with PIL (bilinear for the
    image; nearest for the palette mask, which PIL uses for "P" images whatever it is asked, and which is
    used here for grey masks too). Returns the image as uint8 (3, size, size) — :func:`normalize` finishes
    ``ToTensor`` + ``Normalize`` — and the mask as uint8 (size, size).

    Raises ``datamodules.images.DataError`` naming the file when an image or mask cannot be read, a mask
    is not a palette/grey PNG, or the two differ in size.
    """
    from PIL import Image

    try:
        with Image.open(image_path) as img:
            rgb = img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a damaged file
        raise DataError(f"cannot read image {image_path}: {err}") from None
    try:
        with Image.open(mask_path) as msk:
            if msk.mode not in ("P", "L"):
                raise DataError(f"mask {mask_path} is a {msk.mode} image; VOC masks are palette (P) PNGs of ids")
            mask = msk.copy()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read mask {mask_path}: {err}") from None
    if rgb.size != mask.size:
        raise DataError(f"mask {mask_path} is {mask.size[1]}x{mask.size[0]} but its image is "
                        f"{rgb.size[1]}x{rgb.size[0]}")
    rgb = rgb.resize((size, size), Image.BILINEAR)
    mask = mask.resize((size, size), Image.NEAREST)
    image = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    return image, torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())


def normalize(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) → float32 as ``ToTensor`` (÷255) then ``Normalize`` with ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.float().div(255).sub(mean).div(std)


# -- the reference's position-embedding interpolation ----------------------------------------------------------
def dino_resized_pos_embed(pos_embed: Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """A (1, prefix + n·n, D) position embedding for a rows × cols patch grid as the reference's
    ``forward_selfattention`` computes it: bicubic ``interpolate`` of the n × n patch part with
    ``scale_factor=(rows / n, cols / n)`` (no antialiasing, ``align_corners=False``), zero rows/columns
    appended if rounding falls short; the prefix (CLS) entries unchanged."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = int(math.sqrt(patches.shape[1]))
    if n * n != patches.shape[1]:
        raise ValueError(f"the position embedding holds {patches.shape[1]} patch entries, not a square grid")
    rows, cols = grid
    if (rows, cols) == (n, n):
        return pos_embed
    dim = patches.shape[-1]
    square = patches.reshape(1, n, n, dim).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, scale_factor=(rows / n, cols / n), mode="bicubic")
    if resized.shape[-2] < rows:
        resized = torch.cat([resized, resized.new_zeros(1, dim, rows - resized.shape[-2], resized.shape[-1])], dim=-2)
    if resized.shape[-1] < cols:
        resized = torch.cat([resized, resized.new_zeros(1, dim, rows, cols - resized.shape[-1])], dim=-1)
    resized = resized[..., :rows, :cols].permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos_embed.dtype)
    return torch.cat([prefix, resized], dim=1)


@contextmanager
def dino_position_embedding(vit: nn.Module, grid: tuple[int, int]) -> Iterator[nn.Module]:
    """Within the block, ``vit`` (a timm ViT) sees rows × cols patch grids with the reference's position
    embedding (:func:`dino_resized_pos_embed`) instead of timm's own resampling (bicubic *with* antialiasing,
    a different kernel when upsampling). The embedding and grid size are put back on exit."""
    if getattr(vit, "no_embed_class", False) or getattr(vit, "pos_embed", None) is None:
        raise ValueError("dino_position_embedding needs a timm ViT whose position embedding includes the class "
                         "token (no_embed_class=False), like DINO's")
    original, grid_size = vit.pos_embed, vit.patch_embed.grid_size
    resized = dino_resized_pos_embed(original.detach(), vit.num_prefix_tokens, grid)
    try:
        vit.pos_embed = nn.Parameter(resized, requires_grad=False)
        vit.patch_embed.grid_size = tuple(grid)  # timm's dynamic resampling then has nothing to do
        yield vit
    finally:
        vit.pos_embed = original
        vit.patch_embed.grid_size = grid_size
