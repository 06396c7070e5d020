"""Unsupervised single-object discovery from a ViT's last-block keys, scored by CorLoc, as the field measures it.

Two training-free methods turn the keys of one image into one box:

* **LOST** (Siméoni et al., BMVC 2021; github.com/valeoai/LOST, ``object_discovery.lost``): the Gram matrix of
  the raw keys; the seed is the patch with the fewest positive correlations to the others (lowest degree);
  the ``k_patches`` lowest-degree patches that correlate positively with the seed are summed into a map;
  the box is the 4-connected component of that map's positive part that holds the seed.
* **TokenCut** (Wang et al., CVPR 2022; github.com/YangtaoWANG95/TokenCut, ``object_discovery.ncut``): the
  L2-normalised keys' cosine graph (edge 1 above ``tau``, ``eps`` elsewhere, self-loops included), the second
  smallest generalised eigenvector of ``(D - A) v = λ D v``, split at its mean; the side holding the
  patch of largest ``|v|`` (the seed) is the foreground, and the box is the 4-connected component of the
  foreground that holds the seed.

Both boxes are ``[x0, y0, x1, y1]`` in pixels of the image *before* it was zero-padded (bottom and right) to a
multiple of the patch size, x1/y1 exclusive and clipped to the image, exactly as the reference
``detect_box`` computes them. :func:`corloc` is LOST's CorLoc (``bbox_iou`` with its ``eps``, IoU ≥ 0.5 with
any ground-truth box); :func:`voc_gt_boxes` reads a VOC annotation as LOST's ``extract_gt_VOC`` (0-based:
xmin − 1, ymin − 1; xmax, ymax kept, i.e. exclusive).

Where the reference leaves a choice to the hardware, one rule is fixed here:

* degree ties (LOST): ``torch.argsort(descending=True)`` is not stable, so the reference's order among
  patches of equal degree depends on the device and the torch build; here the patch that comes first in
  row-major order wins (a stable sort);
* the eigen-solve (TokenCut): ``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])`` in the reference;
  here the same generalised problem through its symmetric normalised form
  ``I - D^-1/2 A D^-1/2`` with ``torch.linalg.eigh`` in float64 on the keys' device, ``v = D^-1/2 u`` (the
  same ``vᵀ D v = 1`` scaling; the sign is fixed by the seed as in the reference);
* connected components: ``scipy.ndimage.label``'s default 4-connectivity, here a flood fill from the seed
  written with tensor shifts (only the seed's component is ever used).
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.errors import DataError

__all__ = ["CORLOC_IOU", "Discovery", "bbox_iou", "corloc", "correct", "dino_vit_position_embedding",
           "last_block_keys", "lost", "lost_box", "pad_to_patch", "seed_component", "tokencut", "tokencut_box",
           "voc_gt_boxes"]

CORLOC_IOU = 0.5  # a box is correct when its IoU with some ground-truth box is at least this
BBOX_IOU_EPS = 1e-7  # the eps of LOST's bbox_iou (yolov5's)


@dataclass
class Discovery:
    """One image's discovered object: ``box`` [x0, y0, x1, y1] (pixels, x1/y1 exclusive), the ``seed`` patch
    (row-major index into the grid), and ``mask`` the (h, w) bool grid of the seed's component."""
    box: list[int]
    seed: int
    mask: Tensor


def _check(keys: Tensor, grid_hw: Sequence[int], patch_size: int, image_hw: Sequence[int]) -> tuple[int, int]:
    if keys.ndim != 2:
        raise ValueError(f"keys must be an (N, D) tensor of patch-token keys, got shape {tuple(keys.shape)}")
    h, w = (int(v) for v in grid_hw)
    if h * w != keys.shape[0]:
        raise ValueError(f"grid {h}x{w} holds {h * w} patches but keys has {keys.shape[0]} rows")
    height, width = (int(v) for v in image_hw)
    if patch_size < 1 or height < 1 or width < 1:
        raise ValueError(f"patch_size ({patch_size}) and image_hw ({height}x{width}) must be positive")
    if (math.ceil(height / patch_size), math.ceil(width / patch_size)) != (h, w):
        raise ValueError(f"an image of {height}x{width} px padded to a multiple of {patch_size} gives a "
                         f"{math.ceil(height / patch_size)}x{math.ceil(width / patch_size)} grid, not {h}x{w}")
    return h, w


def seed_component(mask: Tensor, seed: int) -> Tensor:
    """The 4-connected component of the (h, w) bool ``mask`` that holds patch ``seed`` (row-major index), as
    ``scipy.ndimage.label``'s default structure connects pixels; all False when the seed is outside the mask."""
    h, w = mask.shape
    component = torch.zeros_like(mask)
    if not bool(mask.view(-1)[seed]):
        return component
    component.view(-1)[seed] = True
    for _ in range(h * w):  # each pass grows the component by one step; at most h·w steps
        grown = component.clone()
        grown[1:] |= component[:-1]
        grown[:-1] |= component[1:]
        grown[:, 1:] |= component[:, :-1]
        grown[:, :-1] |= component[:, 1:]
        grown &= mask
        if torch.equal(grown, component):
            break
        component = grown
    return component


def _box(component: Tensor, patch_size: int, image_hw: Sequence[int]) -> list[int]:
    """``detect_box``'s box of a component: grid extent (max exclusive) times the patch size, x1/y1 clipped."""
    rows = torch.nonzero(component.any(dim=1)).view(-1)
    cols = torch.nonzero(component.any(dim=0)).view(-1)
    ymin, ymax = int(rows[0]), int(rows[-1]) + 1
    xmin, xmax = int(cols[0]), int(cols[-1]) + 1
    height, width = (int(v) for v in image_hw)
    return [patch_size * xmin, patch_size * ymin, min(patch_size * xmax, width), min(patch_size * ymax, height)]


def lost(keys: Tensor, grid_hw: Sequence[int], patch_size: int, image_hw: Sequence[int],
         k_patches: int = 100) -> Discovery:
    """LOST on one image's keys (see the module docstring); :func:`lost_box` is its box."""
    h, w = _check(keys, grid_hw, patch_size, image_hw)
    if k_patches < 1:
        raise ValueError(f"k_patches must be >= 1, got {k_patches}")
    feats = keys.detach().float()
    gram = feats @ feats.T
    positive = gram > 0
    positive.fill_diagonal_(False)
    degree = positive.sum(dim=1)
    order = torch.sort(degree, stable=True).indices  # lowest degree first; ties: row-major order
    seed = int(order[0])
    potentials = order[:k_patches]
    similars = potentials[gram[seed, potentials] > 0.0]
    seed_map = gram[similars].sum(dim=0).reshape(h, w)
    component = seed_component((seed_map > 0.0).cpu(), seed)
    if not component.any():  # the reference raises too ("The seed is in the background component.")
        raise ValueError("LOST: the seed is in the background component (are the keys all zero?)")
    return Discovery(_box(component, patch_size, image_hw), seed, component)


def lost_box(keys: Tensor, grid_hw: Sequence[int], patch_size: int, image_hw: Sequence[int],
             k_patches: int = 100) -> list[int]:
    """LOST's box ``[x0, y0, x1, y1]`` (pixels of the unpadded image, x1/y1 exclusive).

    ``keys``: (N, D) last-block keys of the N patch tokens (qkv key channels incl. bias, heads concatenated, no
    prefix tokens), row-major over the ``grid_hw`` = (h, w) grid of the image zero-padded to a multiple of
    ``patch_size``; ``image_hw`` the (H, W) before padding."""
    return lost(keys, grid_hw, patch_size, image_hw, k_patches).box


def tokencut(keys: Tensor, grid_hw: Sequence[int], patch_size: int, image_hw: Sequence[int],
             tau: float = 0.2, eps: float = 1e-5) -> Discovery:
    """TokenCut on one image's keys (see the module docstring); :func:`tokencut_box` is its box."""
    h, w = _check(keys, grid_hw, patch_size, image_hw)
    if keys.shape[0] < 3:
        raise ValueError(f"TokenCut needs at least 3 patches (it takes the second smallest of the eigenvectors "
                         f"1 and 2), got {keys.shape[0]}")
    feats = F.normalize(keys.detach().float(), p=2, dim=1)
    cosine = feats @ feats.T
    graph = torch.where(cosine > tau, 1.0, eps).to(torch.float64)  # reference: bool > tau, 0 → eps, float64
    degree = graph.sum(dim=1)
    inv_sqrt = degree.rsqrt()
    laplacian = torch.eye(len(degree), dtype=torch.float64, device=graph.device) \
        - inv_sqrt[:, None] * graph * inv_sqrt[None, :]
    _, vectors = torch.linalg.eigh(laplacian)
    second = (vectors[:, 1] * inv_sqrt).cpu()
    bipartition = second > second.sum() / len(second)
    seed = int(second.abs().argmax())
    if not bipartition[seed]:
        bipartition = ~bipartition
    component = seed_component(bipartition.reshape(h, w), seed)
    return Discovery(_box(component, patch_size, image_hw), seed, component)


def tokencut_box(keys: Tensor, grid_hw: Sequence[int], patch_size: int, image_hw: Sequence[int],
                 tau: float = 0.2, eps: float = 1e-5) -> list[int]:
    """TokenCut's box ``[x0, y0, x1, y1]``; arguments as :func:`lost_box`, ``tau`` the cosine threshold of an
    edge, ``eps`` the weight of a missing one."""
    return tokencut(keys, grid_hw, patch_size, image_hw, tau, eps).box


# -- scoring -------------------------------------------------------------------------------------------------
def bbox_iou(box: Sequence[float], boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of one x1y1x2y2 box with each of (M, 4) boxes, as LOST's ``bbox_iou`` computes it: torch arithmetic on
    the boxes as given (integer boxes, as LOST's, turn float32 where ``eps`` is added to the heights and the
    union), so that IoUs at the 0.5 threshold round as there. Returns a float numpy array."""
    b1 = torch.as_tensor(np.asarray(box))
    b2 = torch.as_tensor(np.asarray(boxes)).reshape(-1, 4).T
    inter = (torch.min(b1[2], b2[2]) - torch.max(b1[0], b2[0])).clamp(0) \
        * (torch.min(b1[3], b2[3]) - torch.max(b1[1], b2[1])).clamp(0)
    w1, h1 = b1[2] - b1[0], b1[3] - b1[1] + BBOX_IOU_EPS
    w2, h2 = b2[2] - b2[0], b2[3] - b2[1] + BBOX_IOU_EPS
    return (inter / (w1 * h1 + w2 * h2 - inter + BBOX_IOU_EPS)).numpy()


def correct(pred_box: Sequence[float], gt_boxes: np.ndarray) -> bool:
    """Whether one predicted box localises an object: IoU ≥ 0.5 with any ground-truth box."""
    return bool(len(gt_boxes)) and bool((bbox_iou(pred_box, gt_boxes) >= CORLOC_IOU).any())


def corloc(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[np.ndarray]) -> float:
    """CorLoc: the fraction of images whose one predicted box has IoU ≥ 0.5 with some ground-truth box of that
    image. One (M_i, 4) array per image; an image without ground-truth boxes counts as a miss (the reference
    tools leave such images out before scoring: filter them first to match). NaN for no image."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted boxes but ground truth for {len(gt_boxes)} images")
    if not len(pred_boxes):
        return float("nan")
    return sum(correct(p, g) for p, g in zip(pred_boxes, gt_boxes)) / len(pred_boxes)


def voc_gt_boxes(xml_path: str | Path, remove_hards: bool = False) -> np.ndarray:
    """(M, 4) int64 ground-truth boxes of a VOC annotation file as LOST's ``extract_gt_VOC``: [xmin − 1,
    ymin − 1, xmax, ymax] per object (VOC's 1-based inclusive pixels → 0-based, max exclusive), in file order;
    ``remove_hards`` drops objects marked truncated or difficult (a missing flag counts as 0). Coordinates
    written as decimals are truncated like ``int(float(s))``. DataError naming the file when it cannot be
    read or lacks a box."""
    path = Path(xml_path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise DataError(f"cannot read annotation {path}: {err}") from None
    boxes = []
    for obj in root.findall("object"):
        if remove_hards and (obj.findtext("truncated", "0").strip() == "1"
                             or obj.findtext("difficult", "0").strip() == "1"):
            continue
        bndbox = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (int(float(bndbox.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"annotation {path}: an object has no valid bndbox (xmin, ymin, xmax, ymax)") from None
        boxes.append([x0 - 1, y0 - 1, x1, y1])
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


# -- keys of a timm ViT --------------------------------------------------------------------------------------
def pad_to_patch(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) → zero-padded at the bottom and right to multiples of ``patch_size`` (the references pad
    the normalised image with zeros)."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, -width % patch_size, 0, -height % patch_size))


def dino_interpolated_pos_embed(pos_embed: Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """DINO's ``interpolate_pos_encoding`` (the model LOST and TokenCut run): the n × n patch embedding resized
    by bicubic ``interpolate`` with ``scale_factor = ((rows + 0.1) / n, (cols + 0.1) / n)``; unchanged for the
    model's own square grid."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = int(math.sqrt(patches.shape[1]))
    if n * n != patches.shape[1]:
        raise ValueError(f"the position embedding holds {patches.shape[1]} patch entries, not a square grid")
    rows, cols = grid
    if (rows, cols) == (n, n):
        return pos_embed
    dim = patches.shape[-1]
    square = patches.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, scale_factor=((rows + 0.1) / n, (cols + 0.1) / n), mode="bicubic")
    if tuple(resized.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"position embedding resized to {tuple(resized.shape[-2:])}, expected {(rows, cols)}")
    return torch.cat([prefix, resized.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


@contextmanager
def dino_vit_position_embedding(vit: nn.Module, grid: tuple[int, int]) -> Iterator[nn.Module]:
    """Within the block the timm ``vit`` sees a rows × cols grid with DINO's own position-embedding
    interpolation (:func:`dino_interpolated_pos_embed`) instead of timm's; put back on exit."""
    if getattr(vit, "no_embed_class", False) or getattr(vit, "pos_embed", None) is None:
        raise ValueError("needs a timm ViT whose position embedding includes the class token, like DINO's")
    original, grid_size = vit.pos_embed, vit.patch_embed.grid_size
    resized = dino_interpolated_pos_embed(original.detach(), vit.num_prefix_tokens, tuple(grid))
    try:
        vit.pos_embed = nn.Parameter(resized, requires_grad=False)
        vit.patch_embed.grid_size = tuple(grid)  # timm's dynamic resampling then has nothing to do
        yield vit
    finally:
        vit.pos_embed = original
        vit.patch_embed.grid_size = grid_size


class _Stop(Exception):
    """Raised by the hook once the last block's qkv output is captured (nothing after it is needed)."""


def key_problem(vit: nn.Module) -> str | None:
    """Why the last-block keys of ``vit`` cannot be read, or None (a timm ViT with a fused qkv Linear)."""
    blocks = getattr(vit, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        return "has no last transformer block with a fused qkv projection to read keys from"
    return None


@torch.no_grad()
def last_block_keys(vit: nn.Module, images: Tensor, dino_pos_embed: bool = True) -> tuple[Tensor, tuple[int, int]]:
    """The last block's keys of a timm ViT: ((B, N, D) float32, (h, w) grid), N = h·w patch tokens, as the
    LOST/TokenCut code reads them: the output of the block's qkv Linear (bias included, before any k-norm),
    its key third (heads concatenated in head order), prefix tokens (CLS, registers) dropped.

    ``images`` (B, 3, H, W), normalised; zero-padded to a multiple of the patch size first (the caller keeps
    the unpadded size for the box). ``dino_pos_embed``: resize the position embedding as DINO's model does
    (:func:`dino_vit_position_embedding`), else timm's own resampling. Eval mode within, modes restored."""
    problem = key_problem(vit)
    if problem:
        raise ValueError(f"this model {problem}")
    patch = vit.patch_embed.patch_size[0]
    padded = pad_to_patch(images, patch)
    grid = (padded.shape[-2] // patch, padded.shape[-1] // patch)
    qkv = vit.blocks[-1].attn.qkv
    captured: dict[str, Tensor] = {}

    def hook(module, args, output):
        captured["qkv"] = output
        raise _Stop

    modes = [(m, m.training) for m in vit.modules()]
    handle = qkv.register_forward_hook(hook)
    weight = vit.patch_embed.proj.weight
    position = dino_vit_position_embedding(vit, grid) if dino_pos_embed else _nothing()
    try:
        vit.eval()
        with position:
            try:
                vit.forward_features(padded.to(device=weight.device, dtype=weight.dtype))
            except _Stop:
                pass
    finally:
        handle.remove()
        for module, mode in modes:
            module.training = mode
    out = captured["qkv"]
    dim = out.shape[-1] // 3
    keys = out[:, vit.num_prefix_tokens:, dim:2 * dim].float()
    if keys.shape[1] != grid[0] * grid[1]:
        raise RuntimeError(f"the last block sees {keys.shape[1]} patch tokens, expected {grid[0]}x{grid[1]}")
    return keys, grid


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


# -- CorLoc over a VOC detection split -----------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_discovery_image(path: str | Path) -> Tensor:
    """An image as the references feed it: PIL RGB at its own size, ``ToTensor`` + ImageNet normalisation,
    (3, H, W) float32. DataError naming the file when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a damaged file
        raise DataError(f"cannot read image {path}: {err}") from None
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


@dataclass
class ImageDiscovery:
    """One image's outcome: its id, ground-truth boxes, and each method's :class:`Discovery` and hit."""
    image_id: str
    gt_boxes: np.ndarray
    lost: Discovery
    tokencut: Discovery
    lost_hit: bool
    tokencut_hit: bool


@dataclass
class CorLocScore:
    lost: float
    tokencut: float
    images: int
    """Images scored (with ``remove_hards``, those left with no box are skipped, as the reference does)."""
    skipped: int
    records: list[ImageDiscovery]


def annotated_image_size(xml_path: str | Path) -> tuple[int, int]:
    """(height, width) from a VOC annotation's <size>, or DataError naming the file."""
    try:
        size = ET.parse(xml_path).getroot().find("size")
        return int(size.findtext("height")), int(size.findtext("width"))
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError):
        raise DataError(f"annotation {xml_path} has no readable <size> (width, height)") from None


class _DiscoveryImages(torch.utils.data.Dataset):
    """(image, ground-truth boxes) per image; None for an image ``remove_hards`` leaves without a box."""

    def __init__(self, image_paths: Sequence[Path], xml_paths: Sequence[Path], remove_hards: bool):
        self.image_paths, self.xml_paths, self.remove_hards = list(image_paths), list(xml_paths), remove_hards

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int):
        gt = voc_gt_boxes(self.xml_paths[index], self.remove_hards)
        if self.remove_hards and len(gt) == 0:
            return None
        return load_discovery_image(self.image_paths[index]), gt


@torch.no_grad()
def discover(vit: nn.Module, image_paths: Sequence[Path], xml_paths: Sequence[Path], image_ids: Sequence[str],
             device: torch.device, remove_hards: bool = False, k_patches: int = 100, tau: float = 0.2,
             eps: float = 1e-5, keep_records: int = 0, num_workers: int = 0) -> CorLocScore:
    """LOST and TokenCut CorLoc of ``vit`` over images at their own size (zero-padded to the patch size, DINO's
    position-embedding interpolation), one image per forward pass as the references (images decoded by
    ``num_workers`` loader processes). ``keep_records``: how many per-image outcomes to keep (for pictures)."""
    from torch.utils.data import DataLoader

    patch = vit.patch_embed.patch_size[0]
    lost_hits = tokencut_hits = scored = skipped = 0
    records: list[ImageDiscovery] = []
    loader = DataLoader(_DiscoveryImages(image_paths, xml_paths, remove_hards), batch_size=None,
                        num_workers=num_workers)
    for image_id, item in zip(image_ids, loader):
        if item is None:
            skipped += 1
            continue
        image, gt = item
        keys, grid = last_block_keys(vit, image[None].to(device))
        image_hw = tuple(image.shape[-2:])
        found_lost = lost(keys[0], grid, patch, image_hw, k_patches)
        found_cut = tokencut(keys[0], grid, patch, image_hw, tau, eps)
        hit_lost, hit_cut = correct(found_lost.box, gt), correct(found_cut.box, gt)
        lost_hits += hit_lost
        tokencut_hits += hit_cut
        scored += 1
        if len(records) < keep_records:
            records.append(ImageDiscovery(image_id, gt, found_lost, found_cut, hit_lost, hit_cut))
    nan = float("nan")
    return CorLocScore(lost_hits / scored if scored else nan, tokencut_hits / scored if scored else nan, scored,
                       skipped, records)
