"""Synthetic stand-in for Pascal VOC 2012 segmentation, written in exactly VOC's folder layout.

Every image is S×S RGB with 1–3 objects drawn from the 20 VOC classes. A class is identified by its
**shape** and its **texture** together, never by its colour: each object gets two random colours, used as
the foreground and background of its class texture. Textures are fine periodic patterns (a period of
2–4 px at every image size), so one 8-px ViT patch holds at least two periods. Backgrounds are cluttered
(gradient, low-frequency noise, flat blobs, coarse low-contrast stripes) but contain no class texture.

Written layout (read unchanged by ``torchvision.datasets.VOCSegmentation(root, year="2012", ...)``)::

    OUT/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    OUT/VOCdevkit/VOC2012/SegmentationClass/<id>.png     palette PNG, 0 background, 1..20 classes, 255 void
    OUT/VOCdevkit/VOC2012/SegmentationObject/<id>.png    palette PNG, 0 background, 1..k instances, 255 void
    OUT/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    OUT/VOCdevkit/VOC2012/Annotations/<id>.xml           VOC detection annotation: one box per object instance
    OUT/VOCdevkit/VOC2012/ImageSets/Main/{train,val,trainval}.txt
    OUT/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png  grey PNG of class ids (the train images)
    OUT/VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt   the train ids (real VOC: the SBD-augmented set)
    OUT/synthetic_voc.json                               marker: generator, format version, parameters

Detection annotations follow VOC: 1-based inclusive pixel coordinates of the instance's visible pixels (its
void band included), ``truncated`` 1 when the object's shape reaches the image border, ``difficult`` 1 when
fewer than :data:`DIFFICULT_FRACTION` of the image's pixels show it outside the void band. The ``trainaug``
split (``SegmentationClassAug`` masks, as the SBD-augmented set is distributed) repeats the train split, so
that protocols built on trainaug (the dense retrieval of ``analysis.retrieval``) run offline.

The marker is written last, into a temporary sibling folder (``.OUT.tmp-<pid>-<random>``) that is renamed
to OUT only when complete: a killed run leaves the previous dataset at OUT (or nothing), never a mix, and a
folder without a matching marker is never used (:func:`ensure_synthetic_voc`). OUT must be new, empty, or
a dataset this generator wrote (marker present, nothing else added): any other folder, e.g. a real VOC
root, is refused untouched (:class:`ForeignDirectoryError`). Runs on one OUT are serialised by an ``flock``
on ``.OUT.lock`` beside it; temporary folders of killed runs are removed by the next run.

Ids are ``train_000001``, ``val_000001``, ... (sortable, unique across splits). Image ``i`` of a split is
drawn from a numpy Generator seeded by ``(seed, split, i)``, so output is byte-identical for a seed
whatever ``num_workers`` is.

Command line (tools/synthetic_voc.py)::

    python -m tools.synthetic_voc OUT_DIR --train 1000 --val 200 --size 128 --seed 0 [--workers 2]
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "VOC_CLASSES",
    "VOC_PALETTE",
    "CLASS_SHAPES",
    "CLASS_TEXTURES",
    "FORMAT_VERSION",
    "MARKER_NAME",
    "GENERATOR_ID",
    "ForeignDirectoryError",
    "generate_synthetic_voc",
    "ensure_synthetic_voc",
    "render_sample",
    "render_annotated_sample",
    "annotation_xml",
    "DIFFICULT_FRACTION",
    "cache_dir_name",
    "SyntheticSource",
]

#: Bumped whenever the generated content changes, so cached datasets of an older format are regenerated.
FORMAT_VERSION = 3  # 2: texture periods no longer scale with image size; 3: detection annotations, trainaug
#: Marker file at the root of every dataset this generator writes, written last: JSON naming the generator
#: (:data:`GENERATOR_ID`), :data:`FORMAT_VERSION` and the parameters (n_train, n_val, size, seed). A folder
#: without it is never used as a dataset, nor overwritten.
MARKER_NAME = "synthetic_voc.json"
GENERATOR_ID = "vitssl utils.synthetic_voc"  # an identity string written into every marker: never change it (the module moved)
# In a temporary folder while it is being written (same JSON), so leftovers of a killed run are known as ours.
_PARTIAL_NAME = "synthetic_voc.partial"
# The marker cached sets carried before generated folders were marked (same keys, no "generator"): such a
# folder is ours, so it may be rebuilt, but it is never used as it is.
_LEGACY_MARKER_NAME = ".complete"

from config.hparams import DataConfig  # noqa: E402
from datamodules.errors import DataError  # noqa: E402
from datamodules.registry import DATASETS  # noqa: E402

# The 21 class names live with the VOC layout reader; re-exported here for the generator's users.
from datamodules.voc import VOC_CLASSES  # noqa: E402

IGNORE_INDEX = 255
JPEG_QUALITY = 90
_SPLIT_CODES = {"train": 0, "val": 1}


def _voc_palette() -> List[int]:
    """The standard VOC colour map (the ``bitget`` construction of the devkit), flattened to 768 ints."""
    palette: List[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    return palette


VOC_PALETTE: List[int] = _voc_palette()


# ----------------------------------------------------------------------------------------------------
# Shapes: boolean functions of local coordinates (p, q), the object's bounding box mapped to ~[-1, 1]^2
# (q grows downwards, like image rows).
# ----------------------------------------------------------------------------------------------------

ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _polygon(p: np.ndarray, q: np.ndarray, verts: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over pixels (loops only over the few edges)."""
    inside = np.zeros(p.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > q) != (y2 > q)
        x_at = x1 + (q - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (p < x_at)
    return inside


def _regular(n: int, radius: float = 1.0, start_deg: float = -90.0) -> List[Tuple[float, float]]:
    angles = [math.radians(start_deg + 360.0 * k / n) for k in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.48) -> List[Tuple[float, float]]:
    verts = []
    for k in range(2 * points):
        r = outer if k % 2 == 0 else inner
        a = math.radians(-90.0 + 180.0 * k / points)
        verts.append((r * math.cos(a), r * math.sin(a)))
    return verts


_PENTAGON = _regular(5)
_HEXAGON = _regular(6, start_deg=0.0)
_STAR = _star()
_TRIANGLE = [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
_TRAPEZOID = [(-0.45, -0.7), (0.45, -0.7), (1.0, 0.7), (-1.0, 0.7)]
_ARROW = [(-1.0, -0.28), (0.15, -0.28), (0.15, -0.75), (1.0, 0.0), (0.15, 0.75), (0.15, 0.28), (-1.0, 0.28)]
_L_SHAPE = [(-0.8, -0.95), (-0.2, -0.95), (-0.2, 0.35), (0.8, 0.35), (0.8, 0.95), (-0.8, 0.95)]


def _heart(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    x = 1.15 * p
    y = -1.15 * q + 0.15
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0


SHAPES: Dict[str, ShapeFn] = {
    "circle": lambda p, q: p * p + q * q <= 1.0,
    "ellipse": lambda p, q: p * p + (q / 0.55) ** 2 <= 1.0,
    "square": lambda p, q: (np.abs(p) <= 0.8) & (np.abs(q) <= 0.8),
    "rectangle": lambda p, q: (np.abs(p) <= 1.0) & (np.abs(q) <= 0.5),
    "triangle": lambda p, q: _polygon(p, q, _TRIANGLE),
    "diamond": lambda p, q: np.abs(p) + np.abs(q) <= 1.0,
    "pentagon": lambda p, q: _polygon(p, q, _PENTAGON),
    "hexagon": lambda p, q: _polygon(p, q, _HEXAGON),
    "star": lambda p, q: _polygon(p, q, _STAR),
    "cross": lambda p, q: ((np.abs(p) <= 0.34) & (np.abs(q) <= 1.0)) | ((np.abs(q) <= 0.34) & (np.abs(p) <= 1.0)),
    "ring": lambda p, q: (p * p + q * q <= 1.0) & (p * p + q * q >= 0.5 ** 2),
    "heart": _heart,
    "crescent": lambda p, q: (p * p + q * q <= 1.0) & ((p - 0.5) ** 2 + (q + 0.1) ** 2 > 0.78 ** 2),
    "trapezoid": lambda p, q: _polygon(p, q, _TRAPEZOID),
    "arrow": lambda p, q: _polygon(p, q, _ARROW),
    "l_shape": lambda p, q: _polygon(p, q, _L_SHAPE),
    "frame": lambda p, q: (np.maximum(np.abs(p), np.abs(q)) <= 0.85) & (np.maximum(np.abs(p), np.abs(q)) >= 0.42),
    "t_shape": lambda p, q: ((np.abs(q + 0.62) <= 0.3) & (np.abs(p) <= 0.95))
    | ((np.abs(p) <= 0.3) & (q >= -0.62) & (q <= 0.95)),
    "hourglass": lambda p, q: (np.abs(p) <= np.abs(q) * 0.95 + 0.08) & (np.abs(q) <= 0.95),
    "semicircle": lambda p, q: (p * p + (q - 0.4) ** 2 <= 1.0) & (q <= 0.4),
}

# ----------------------------------------------------------------------------------------------------
# Textures: boolean patterns of (u, v) = image coordinates in units of "base pixels" (1 base px = S/64
# image px, but never less than 1 px), plus (ru = radius from the object's centre in base px).
# Periods are 2–4 base px. Their (phase-invariant) power spectra peak at distinct frequencies.
# ----------------------------------------------------------------------------------------------------

TextureFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _band(t: np.ndarray, period: float, duty: float = 0.5) -> np.ndarray:
    """Square wave: True on the first ``duty`` fraction of every period of ``t``."""
    return np.mod(t, period) < duty * period


def _tri(t: np.ndarray, period: float, amplitude: float) -> np.ndarray:
    """Triangle wave in [0, amplitude]."""
    return amplitude * np.abs(2.0 * np.mod(t / period, 1.0) - 1.0)


TEXTURES: Dict[str, TextureFn] = {
    "hstripes2": lambda u, v, r: _band(v, 2.0),
    "vstripes2": lambda u, v, r: _band(u, 2.0),
    "hstripes4": lambda u, v, r: _band(v, 4.0),
    "vstripes4": lambda u, v, r: _band(u, 4.0),
    "hstripes3": lambda u, v, r: _band(v, 3.0, 1.0 / 3.0),
    "vstripes3": lambda u, v, r: _band(u, 3.0, 1.0 / 3.0),
    "diag4": lambda u, v, r: _band(u + v, 4.0),
    "antidiag4": lambda u, v, r: _band(u - v, 4.0),
    "diag3": lambda u, v, r: _band(u + v, 3.0, 1.0 / 3.0),
    "antidiag3": lambda u, v, r: _band(u - v, 3.0, 1.0 / 3.0),
    "checker1": lambda u, v, r: _band(u, 2.0) ^ _band(v, 2.0),
    "checker2": lambda u, v, r: _band(u, 4.0) ^ _band(v, 4.0),
    "dots4": lambda u, v, r: _band(u, 4.0) & _band(v, 4.0),
    "grid3": lambda u, v, r: ~(_band(u, 3.0, 2.0 / 3.0) & _band(v, 3.0, 2.0 / 3.0)),
    "plaid_h2v4": lambda u, v, r: _band(v, 2.0) ^ _band(u, 4.0),
    "plaid_v2h4": lambda u, v, r: _band(u, 2.0) ^ _band(v, 4.0),
    "crosshatch3": lambda u, v, r: _band(u + v, 3.0, 1.0 / 3.0) | _band(u - v, 3.0, 1.0 / 3.0),
    "rings": lambda u, v, r: _band(r, 3.5, 0.5),
    "zigzag": lambda u, v, r: _band(v + _tri(u, 6.0, 3.0), 4.0),
    "finedots": lambda u, v, r: _band(u, 2.0) & _band(v, 2.0),
}

#: Class index (1..20) → shape name / texture name.  Index 0 (background) has neither.
CLASS_SHAPES: Tuple[str, ...] = ("",) + tuple(SHAPES)
CLASS_TEXTURES: Tuple[str, ...] = ("",) + tuple(TEXTURES)
assert len(CLASS_SHAPES) == len(CLASS_TEXTURES) == len(VOC_CLASSES) == 21

_SHAPE_FNS: Tuple[Optional[ShapeFn], ...] = (None,) + tuple(SHAPES.values())
_TEXTURE_FNS: Tuple[Optional[TextureFn], ...] = (None,) + tuple(TEXTURES.values())


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _texture_scale(size: int) -> float:
    """Image px per texture base px. Fixed at 1 (periods 2–4 px at every image size) so that an 8-px
    patch — the smallest ViT patch in use — holds at least two periods at any resolution."""
    return 1.0


def _void_radii(size: int) -> Tuple[int, int]:
    """(inner, outer) half-widths of the void band. Total ≈ 1.5·S/64 px, at least 2 (1 px each side)."""
    total = max(2, int(round(1.5 * size / 64.0)))
    return total // 2, total - total // 2


def _disk_offsets(radius: int) -> List[Tuple[int, int]]:
    return [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if (dy or dx) and dy * dy + dx * dx <= radius * radius
    ]


def _differs_within(ids: np.ndarray, radius: int, where: np.ndarray) -> np.ndarray:
    """True where some pixel within Euclidean ``radius`` has a different id (image edges do not count)."""
    out = np.zeros(ids.shape, dtype=bool)
    if radius <= 0:
        return out
    h, w = ids.shape
    padded = np.pad(ids, radius, mode="edge")
    for dy, dx in _disk_offsets(radius):
        shifted = padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
        out |= shifted != ids
    return out & where


def _void_band(instances: np.ndarray, size: int) -> np.ndarray:
    r_in, r_out = _void_radii(size)
    obj = instances > 0
    return _differs_within(instances, r_in, obj) | _differs_within(instances, r_out, ~obj)


def _random_colour_pair(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Two uniformly random RGB colours whose luminances differ by at least 80 (so textures stay visible)."""
    lum_w = np.array([0.299, 0.587, 0.114])
    c1 = rng.integers(0, 256, size=3)
    cands = rng.integers(0, 256, size=(32, 3))
    ok = np.abs(cands @ lum_w - c1 @ lum_w) >= 80.0
    if ok.any():
        c2 = cands[int(np.argmax(ok))]
    else:  # mid-grey c1 with unlucky candidates: push the luminance away explicitly
        c2 = np.clip(255 - c1 + rng.integers(-30, 31, size=3), 0, 255)
        if abs((c2 - c1) @ lum_w) < 80.0:
            c2 = np.full(3, 255 if c1 @ lum_w < 128 else 0)
    if rng.random() < 0.5:
        c1, c2 = c2, c1
    return c1.astype(np.float32), c2.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid bilinearly upsampled to size×size."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1, channels)).astype(np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size)
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = (t - i0)[:, None]
    rows = grid[i0] * (1.0 - f)[:, :, None] + grid[i0 + 1] * f[:, :, None]  # (size, cells+1, C)
    cols = rows[:, i0] * (1.0 - f.T)[:, :, None] + rows[:, i0 + 1] * f.T[:, :, None]
    return cols


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Cluttered background: gradient + low-frequency colour noise + flat blobs + coarse faint stripes."""
    c_a = rng.uniform(30, 225, size=3).astype(np.float32)
    c_b = np.clip(c_a + rng.uniform(-70, 70, size=3), 0, 255).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    g = (np.cos(ang) * xx + np.sin(ang) * yy) / size
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    img = c_a + (c_b - c_a) * g[:, :, None]
    img += 28.0 * _smooth_noise(rng, size, cells=int(rng.integers(3, 7)))

    for _ in range(int(rng.integers(2, 6))):  # flat, semi-transparent blobs
        cy, cx = rng.uniform(0, size, size=2)
        ry, rx = rng.uniform(0.08, 0.3, size=2) * size
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        alpha = rng.uniform(0.25, 0.55)
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        img[blob] = (1 - alpha) * img[blob] + alpha * colour

    scale = _texture_scale(size)
    for _ in range(int(rng.integers(0, 3))):  # coarse, faint stripes (period >= 10 base px): not a class texture
        y0, x0 = rng.integers(0, size - size // 4, size=2)
        h, w = rng.integers(size // 6, size // 2, size=2)
        period = rng.uniform(10.0, 16.0) * scale
        a = rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * (np.cos(a) * xx + np.sin(a) * yy) / period)
        box = np.zeros((size, size), dtype=bool)
        box[y0 : y0 + h, x0 : x0 + w] = True
        img[box] += (rng.uniform(8, 18) * wave[box])[:, None]
    return img


class _Obj:
    __slots__ = ("cls", "mask", "area", "cy", "cx")

    def __init__(self, cls: int, mask: np.ndarray, cy: float, cx: float):
        self.cls, self.mask, self.cy, self.cx = cls, mask, cy, cx
        self.area = int(mask.sum())


def _shape_mask(
    rng: np.random.Generator, cls: int, size: int, yy: np.ndarray, xx: np.ndarray
) -> Tuple[np.ndarray, float, float]:
    radius = rng.uniform(0.15, 0.34) * size
    margin = 0.6 * radius
    cy, cx = rng.uniform(margin, size - margin, size=2)
    theta = rng.uniform(-0.3, 0.3)  # small rotation (±17°) keeps e.g. square and diamond apart
    ax, ay = rng.uniform(0.85, 1.15, size=2)
    dy, dx = yy - cy, xx - cx
    cos, sin = math.cos(theta), math.sin(theta)
    p = (cos * dx + sin * dy) / (radius * ax)
    q = (-sin * dx + cos * dy) / (radius * ay)
    mask = _SHAPE_FNS[cls](p, q)  # type: ignore[misc]
    return mask, float(cy), float(cx)


def render_sample(size: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image. Returns ``(rgb uint8 (S,S,3), class labels uint8 (S,S), instance ids uint8 (S,S))``.

    Labels are 0 background, 1..20 classes, 255 on the void band; instance ids are 1..k in painting order
    (later objects occlude earlier ones), 0 background, 255 on the same void band. Every placed object keeps
    at least half of its own area visible and some non-void pixels.
    """
    rgb, labels, instances, _ = render_annotated_sample(size, rng)
    return rgb, labels, instances


#: An object shown by fewer non-void pixels than this fraction of the image is marked ``difficult``.
DIFFICULT_FRACTION = 0.02


def render_annotated_sample(
    size: int, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[dict]]:
    """:func:`render_sample` (the same draws, the same arrays) plus one detection annotation per instance, in
    instance order: ``{"name", "bbox": (xmin, ymin, xmax, ymax) 1-based inclusive, "truncated", "difficult"}``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy += 0.5
    xx += 0.5
    min_area = max(12, int(0.012 * size * size))
    min_core = max(3, int(0.002 * size * size))
    scale = _texture_scale(size)

    for _attempt in range(100):
        n_objects = int(rng.integers(1, 4))
        objs: List[_Obj] = []
        visible: List[np.ndarray] = []
        for _ in range(n_objects):
            cls = int(rng.integers(1, 21))
            for _try in range(30):
                mask, cy, cx = _shape_mask(rng, cls, size, yy, xx)
                area = int(mask.sum())
                if area < min_area:
                    continue
                if any(int((vis & ~mask).sum()) < 0.5 * o.area for o, vis in zip(objs, visible)):
                    continue  # would hide more than half of an earlier object
                visible = [vis & ~mask for vis in visible] + [mask]
                objs.append(_Obj(cls, mask, cy, cx))
                break
        if not objs:
            continue
        instances = np.zeros((size, size), dtype=np.uint8)
        labels = np.zeros((size, size), dtype=np.uint8)
        for k, o in enumerate(objs, start=1):
            instances[o.mask] = k
            labels[o.mask] = o.cls
        void = _void_band(instances, size)
        core_counts = np.bincount(instances[~void], minlength=len(objs) + 1)
        if (core_counts[1:] < min_core).any():
            continue  # an object would be almost all void band: draw the image again
        break
    else:  # pragma: no cover - practically unreachable
        raise RuntimeError(f"could not place objects in a {size}px image")

    img = _background(rng, size, yy, xx)
    u0, v0 = rng.uniform(0, 64, size=2)  # one random phase per image for the texture lattice
    for o in objs:
        c1, c2 = _random_colour_pair(rng)
        m = o.mask
        u = xx[m] / scale + u0
        v = yy[m] / scale + v0
        r = np.hypot(xx[m] - o.cx, yy[m] - o.cy) / scale + rng.uniform(0, 4)
        pattern = _TEXTURE_FNS[o.cls](u, v, r)  # type: ignore[misc]
        img[m] = np.where(pattern[:, None], c1, c2)
    img += rng.normal(0.0, 4.0, size=img.shape).astype(np.float32)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    annotations = []
    for k, o in enumerate(objs, start=1):
        painted = instances == k  # visible pixels, void band included (the box of what is seen)
        rows, cols = np.flatnonzero(painted.any(axis=1)), np.flatnonzero(painted.any(axis=0))
        shown = int((painted & ~void).sum())
        border = bool(o.mask[0].any() or o.mask[-1].any() or o.mask[:, 0].any() or o.mask[:, -1].any())
        annotations.append({
            "name": VOC_CLASSES[o.cls],
            "bbox": (int(cols[0]) + 1, int(rows[0]) + 1, int(cols[-1]) + 1, int(rows[-1]) + 1),
            "truncated": int(border), "difficult": int(shown < DIFFICULT_FRACTION * size * size),
        })
    labels[void] = IGNORE_INDEX
    instances[void] = IGNORE_INDEX
    return rgb, labels, instances, annotations


def annotation_xml(image_id: str, size: int, annotations: Sequence[dict]) -> str:
    """A VOC ``Annotations/<id>.xml`` document for one S×S image."""
    objects = "".join(
        f"  <object>\n    <name>{a['name']}</name>\n    <pose>Unspecified</pose>\n"
        f"    <truncated>{a['truncated']}</truncated>\n    <difficult>{a['difficult']}</difficult>\n"
        f"    <bndbox>\n      <xmin>{a['bbox'][0]}</xmin>\n      <ymin>{a['bbox'][1]}</ymin>\n"
        f"      <xmax>{a['bbox'][2]}</xmax>\n      <ymax>{a['bbox'][3]}</ymax>\n    </bndbox>\n  </object>\n"
        for a in annotations)
    return (f"<annotation>\n  <folder>VOC2012</folder>\n  <filename>{image_id}.jpg</filename>\n"
            f"  <source>\n    <database>vitssl synthetic VOC</database>\n  </source>\n"
            f"  <size>\n    <width>{size}</width>\n    <height>{size}</height>\n    <depth>3</depth>\n  </size>\n"
            f"  <segmented>1</segmented>\n{objects}</annotation>\n")


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _voc_dir(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def _image_ids(split: str, n: int) -> List[str]:
    return [f"{split}_{i:06d}" for i in range(1, n + 1)]


def _palette_png(arr: np.ndarray, path: Path) -> None:
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
    im.putpalette(VOC_PALETTE)
    im.save(path, format="PNG")


def _write_one(voc: Path, split: str, index: int, size: int, seed: int) -> None:
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    rgb, labels, instances, annotations = render_annotated_sample(size, rng)
    image_id = f"{split}_{index:06d}"
    (voc / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, size, annotations))
    if split == "train":  # the trainaug split: grey PNGs of ids, as the SBD-augmented masks are distributed
        Image.fromarray(labels, "L").save(voc / "SegmentationClassAug" / f"{image_id}.png", format="PNG")
    Image.fromarray(rgb, "RGB").save(
        voc / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=JPEG_QUALITY, subsampling=0  # 4:4:4
    )
    _palette_png(labels, voc / "SegmentationClass" / f"{image_id}.png")
    _palette_png(instances, voc / "SegmentationObject" / f"{image_id}.png")


def _write_chunk(args: Tuple[str, str, int, int, int, int]) -> int:
    voc, split, start, stop, size, seed = args
    for index in range(start, stop):
        _write_one(Path(voc), split, index, size, seed)
    return stop - start


def _exit_with_parent(parent_pid: int) -> None:
    """Pool worker initializer. A SIGKILLed parent gives its pool no chance to stop the workers: they would
    finish their chunk, then wait forever for work while holding the inherited lock (the next run on the
    same folder would hang). A watcher thread ends the worker within 0.2 s of its parent's death."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _validate(
    n_train: object, n_val: object, size: object, seed: object, num_workers: object = 0
) -> Tuple[int, int, int, int, int]:
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 1)
    size = _check_int("size", size, 16)
    if size > 4096:
        raise ValueError(f"size must be <= 4096, got {size}")
    if n_train > 999_999 or n_val > 999_999:
        raise ValueError("n_train and n_val must be <= 999999 (ids have 6 digits)")
    seed = _check_int("seed", seed, 0)
    num_workers = _check_int("num_workers", num_workers, 0)
    return n_train, n_val, size, seed, num_workers


def _render_into(root: Path, n_train: int, n_val: int, size: int, seed: int, num_workers: int) -> None:
    """Renders every image, mask and split list into ``root`` (a fresh temporary folder of :func:`_build`)."""
    voc = _voc_dir(root)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", os.path.join("ImageSets", "Segmentation"),
                "Annotations", "SegmentationClassAug", os.path.join("ImageSets", "Main")):
        (voc / sub).mkdir(parents=True, exist_ok=True)

    counts = {"train": n_train, "val": n_val}
    if num_workers == 0:
        for split, n in counts.items():
            _write_chunk((str(voc), split, 1, n + 1, size, seed))
    else:
        import concurrent.futures as cf

        chunk = max(1, min(64, (n_train + n_val) // (4 * num_workers) or 1))
        jobs = [
            (str(voc), split, start, min(start + chunk, n + 1), size, seed)
            for split, n in counts.items()
            for start in range(1, n + 1, chunk)
        ]
        # Forked workers share the lock of _target_lock, so a killed run's workers must not outlive it.
        with cf.ProcessPoolExecutor(
            max_workers=num_workers, initializer=_exit_with_parent, initargs=(os.getpid(),)
        ) as pool:
            for _ in pool.map(_write_chunk, jobs):
                pass

    sets = voc / "ImageSets" / "Segmentation"
    train_ids, val_ids = _image_ids("train", n_train), _image_ids("val", n_val)
    for name, ids in (("train", train_ids), ("val", val_ids), ("trainval", train_ids + val_ids)):
        (sets / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
        (voc / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    (sets / "trainaug.txt").write_text("".join(i + "\n" for i in train_ids))


def generate_synthetic_voc(out_dir, n_train: int, n_val: int, size: int, seed: int, num_workers: int = 0) -> Path:
    """Writes OUT_DIR/VOCdevkit/VOC2012/... and OUT_DIR/synthetic_voc.json; returns OUT_DIR (the root
    torchvision's VOCSegmentation takes).

    ``num_workers`` > 0 renders in that many processes; the files are identical either way.

    OUT_DIR must be new, empty, or a dataset this generator wrote (its :data:`MARKER_NAME` marker and only
    the files that marker's parameters imply); anything else raises :class:`ForeignDirectoryError` before
    anything is written. The new dataset is written into a temporary sibling folder and renamed into place
    only when complete, so an interruption leaves the previous dataset (or nothing) at OUT_DIR.
    """
    n_train, n_val, size, seed, num_workers = _validate(n_train, n_val, size, seed, num_workers)
    _build(Path(out_dir), n_train, n_val, size, seed, num_workers, reuse_complete=False)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------------
# Ownership, markers and the atomic swap
# ----------------------------------------------------------------------------------------------------


class ForeignDirectoryError(DataError):
    """The target folder holds something this generator did not write; nothing was written or removed."""


def cache_dir_name(n_train: int, n_val: int, size: int, seed: int) -> str:
    return f"synthetic_voc_t{n_train}_v{n_val}_s{size}_seed{seed}"


def _marker_content(n_train: int, n_val: int, size: int, seed: int) -> dict:
    return {
        "generator": GENERATOR_ID, "format_version": FORMAT_VERSION,
        "n_train": n_train, "n_val": n_val, "size": size, "seed": seed,
    }


def _write_json_synced(path: Path, content: dict) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps(content, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)


def _own_params(root: Path) -> Optional[Tuple[int, int]]:
    """(n_train, n_val) from a marker of this generator in ``root``, or None when there is none.

    Accepts the final marker, the in-progress marker of a temporary folder and the legacy ``.complete``
    marker that cached sets carried before the generator marked its output (same keys, no "generator").
    """
    for name in (MARKER_NAME, _PARTIAL_NAME, _LEGACY_MARKER_NAME):
        try:
            found = json.loads((root / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(found, dict):
            continue
        legacy = name == _LEGACY_MARKER_NAME and "generator" not in found and "format_version" in found
        if not (legacy or found.get("generator") == GENERATOR_ID):
            continue
        try:
            n_train, n_val, _size, _seed, _ = _validate(
                found.get("n_train"), found.get("n_val"), found.get("size"), found.get("seed")
            )
        except ValueError:
            continue
        return n_train, n_val
    return None


def _layout(n_train: int, n_val: int) -> dict:
    """Every name the generator writes for these counts: {"files": names, "dirs": {name: sub-layout}}."""
    ids = _image_ids("train", n_train) + _image_ids("val", n_val)

    def files(ext: str) -> dict:
        return {"files": frozenset(f"{i}.{ext}" for i in ids)}

    return {
        "files": {MARKER_NAME, _PARTIAL_NAME, _LEGACY_MARKER_NAME},
        "dirs": {"VOCdevkit": {"dirs": {"VOC2012": {"dirs": {
            "JPEGImages": files("jpg"),
            "SegmentationClass": files("png"),
            "SegmentationObject": files("png"),
            "Annotations": files("xml"),
            "SegmentationClassAug": {"files": frozenset(f"{i}.png" for i in _image_ids("train", n_train))},
            "ImageSets": {"dirs": {"Segmentation": {"files": {"train.txt", "val.txt", "trainval.txt", "trainaug.txt"}},
                                   "Main": {"files": {"train.txt", "val.txt", "trainval.txt"}}}},
        }}}}},
    }


def _first_foreign_entry(folder: Path, layout: dict, prefix: str = "") -> Optional[str]:
    """The first path (relative, sorted order) under ``folder`` that ``layout`` does not name; None if none.
    Symbolic links are never followed and never count as ours."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = prefix + entry.name
        sub = layout.get("dirs", {}).get(entry.name)
        if sub is not None and entry.is_dir(follow_symlinks=False):
            found = _first_foreign_entry(Path(entry.path), sub, rel + "/")
            if found is not None:
                return found
        elif not (entry.name in layout.get("files", ()) and entry.is_file(follow_symlinks=False)):
            return rel
    return None


def _why_not_ours(target: Path) -> Optional[str]:
    """None when ``target`` is missing, an empty folder, or a folder holding only what this generator
    wrote under its marker; otherwise one sentence saying what is there."""
    if not os.path.lexists(target):
        return None
    if target.is_symlink() or not target.is_dir():
        return f"{target} exists and is not a folder"
    try:
        with os.scandir(target) as it:
            names = sorted(e.name for e in it)
        if not names:
            return None
        params = _own_params(target)
        if params is None:
            listing = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            return (f"{target} is not empty and was not made by datamodules.synthetic_voc "
                    f"(no valid {MARKER_NAME} marker; it holds {listing})")
        foreign = _first_foreign_entry(target, _layout(*params))
    except FileNotFoundError:  # renamed away meanwhile by a run holding the lock (we check again under it)
        if os.path.lexists(target):
            raise
        return None
    if foreign is not None:
        return f"{target} was made by datamodules.synthetic_voc but also holds {foreign}, which it did not write"
    return None


def _refuse_unless_ours(target: Path) -> None:
    reason = _why_not_ours(target)
    if reason is not None:
        raise ForeignDirectoryError(
            f"{reason}: nothing was written; choose a new or empty folder, or move this one away yourself"
        )


def _is_complete(root: Path, expected: dict) -> bool:
    """True only for a finished dataset of exactly these parameters (its marker is written last)."""
    try:
        found = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if found != expected:
        return False
    sets = _voc_dir(root) / "ImageSets" / "Segmentation"
    return all((sets / f"{s}.txt").is_file() for s in ("train", "val", "trainval"))


def _is_owned_leftover(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and _own_params(path) is not None and _why_not_ours(path) is None


def _remove_leftovers(target: Path) -> None:
    """Deletes temporary and set-aside folders of earlier, killed runs for ``target`` — only folders with
    our exact name pattern that hold a marker of this generator and nothing else. Called with the lock
    held, so no live run of ours is writing them."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(tmp|old)-\d+-[0-9a-f]{8}")
    for path in target.parent.iterdir():
        if pattern.fullmatch(path.name) and _is_owned_leftover(path):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _target_lock(target: Path) -> Iterator[bool]:
    """Exclusive advisory lock (POSIX ``flock``) on ``<parent>/.<name>.lock``, serialising every run of this
    generator for one target. Yields False where no lock can be taken (no fcntl, or a file system without
    flock): the build stays correct (atomic rename), only leftovers of killed runs are then left alone."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    with open(target.parent / f".{target.name}.lock", "a") as fh:  # "a": an existing file keeps its bytes
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            locked = True
        except OSError:  # pragma: no cover - e.g. some network file systems
            locked = False
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Renames the finished ``tmp`` to ``target``. A previous dataset of ours is renamed aside first (rename
    never merges folders) and deleted after; if the final rename fails it is put back."""
    _refuse_unless_ours(target)  # again, right before touching it
    aside = None
    if os.path.lexists(target) and any(target.iterdir()):
        aside = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, aside)
    try:
        os.rename(tmp, target)  # onto nothing or an empty folder: atomic on one file system
    except BaseException:
        if aside is not None and not os.path.lexists(target):
            os.rename(aside, target)  # put the previous dataset back
        raise
    _fsync_dir(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _build(target: Path, n_train: int, n_val: int, size: int, seed: int, num_workers: int,
           reuse_complete: bool) -> None:
    """Writes a complete dataset at ``target`` (see generate_synthetic_voc); with ``reuse_complete`` a
    complete one of the same parameters found there (e.g. written by a concurrent process) is kept."""
    target = target.resolve()
    expected = _marker_content(n_train, n_val, size, seed)
    _refuse_unless_ours(target)  # before anything is written, lock file included
    target.parent.mkdir(parents=True, exist_ok=True)
    with _target_lock(target) as locked:
        if reuse_complete and _is_complete(target, expected):  # finished by another process while we waited
            return
        _refuse_unless_ours(target)
        if locked:
            _remove_leftovers(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_json_synced(tmp / _PARTIAL_NAME, expected)  # marks the folder as ours from the start
            _render_into(tmp, n_train, n_val, size, seed, num_workers)
            if hasattr(os, "sync"):
                os.sync()  # images and lists reach the disk before the marker that declares them complete
            _write_json_synced(tmp / MARKER_NAME, expected)
            (tmp / _PARTIAL_NAME).unlink()
            _swap_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if reuse_complete and _is_complete(target, expected):  # lost a race with a run holding no lock
                return
            raise


# ----------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------


# What a folder of a dataset holds (a VOC root, its VOCdevkit or VOC2012 folder, or a set this generator wrote):
# a cache root holding one of these is that dataset, and the cache would write into it.
_DATASET_ENTRIES = ("VOCdevkit", "VOC2012", "JPEGImages", "SegmentationClass", "SegmentationObject", "Annotations",
                    "ImageSets", MARKER_NAME, _LEGACY_MARKER_NAME)
_LEFTOVER = re.compile(r"\.(?P<target>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")


def cache_root_problem(cache_root) -> Optional[str]:
    """Why ``cache_root`` cannot hold generated sets (None when it can): it is (or is inside) a dataset folder,
    e.g. a real VOC root — the cache, its lock and its temporary folders would be written into that dataset."""
    root = Path(cache_root)
    if os.path.lexists(root) and not root.is_dir():
        return f"{root} exists and is not a folder"
    inside = next((p for p in (root.resolve(), *root.resolve().parents) if p.name == "VOCdevkit"), None)
    held = next((name for name in _DATASET_ENTRIES if os.path.lexists(root / name)), None)
    if inside is None and held is None:
        return None
    what = f"it is inside the dataset folder {inside}" if inside is not None else f"it holds {held}: a dataset's folder"
    own = (inside.parent if inside is not None else root) / "synthetic"
    return (f"{root} cannot hold the generated data's cache ({what}, which the cache would write into); nothing was "
            f"written; give a folder of its own, e.g. {own}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


@contextlib.contextmanager
def _lock_if_free(target: Path) -> Iterator[bool]:
    """The lock of ``target`` (see :func:`_target_lock`) taken without waiting; False when a build holds it, or
    there is no lock file (nothing is created here) or no ``flock``."""
    try:
        import fcntl

        fd = os.open(target.parent / f".{target.name}.lock", os.O_RDONLY)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove_dead_leftovers(cache_root: Path) -> None:
    """Deletes the temporary and set-aside folders that killed builds of any set in ``cache_root`` left: only
    folders with our name pattern, holding our marker and nothing else, whose builder process is gone and whose
    set's lock no build holds (so a build running on another machine of a shared file system keeps its folder)."""
    try:
        entries = list(cache_root.iterdir())
    except OSError:
        return
    for path in entries:
        found = _LEFTOVER.fullmatch(path.name)
        if found is None or _pid_alive(int(found["pid"])) or not _is_owned_leftover(path):
            continue
        with _lock_if_free(cache_root / found["target"]) as free:
            if free and path.exists():
                shutil.rmtree(path, ignore_errors=True)


def ensure_synthetic_voc(cache_root, n_train: int, n_val: int, size: int, seed: int) -> Path:
    """Generate once and cache: returns a root folder under cache_root whose name encodes the parameters
    (cache_root/synthetic_voc_t{n_train}_v{n_val}_s{size}_seed{seed}). A dataset there is used only when its
    :data:`MARKER_NAME` marker (written last) has exactly these parameters and the current format version;
    otherwise it is rebuilt like :func:`generate_synthetic_voc` does (temporary sibling folder renamed into
    place when complete), which refuses (:class:`ForeignDirectoryError`, a DataError) a folder of that name
    holding anything the generator did not write.

    Concurrent callers are serialised by an ``flock`` on ``.<name>.lock`` beside the dataset; the loser
    of the race finds the winner's complete dataset and returns it.
    """
    n_train, n_val, size, seed, _ = _validate(n_train, n_val, size, seed)
    cache_root = Path(cache_root)
    problem = cache_root_problem(cache_root)
    if problem:  # before anything is written: no lock file, no temporary folder
        raise ForeignDirectoryError(problem)
    final = cache_root / cache_dir_name(n_train, n_val, size, seed)
    _remove_dead_leftovers(cache_root)  # every use of the cache, not only a rebuild of the same set
    if _is_complete(final, _marker_content(n_train, n_val, size, seed)):
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    _build(final, n_train, n_val, size, seed, num_workers=0, reuse_complete=True)
    return final


# ----------------------------------------------------------------------------------------------------
# The dataset source --data.dataset=synthetic (see datamodules/registry.py).
# ----------------------------------------------------------------------------------------------------
class SyntheticSource:
    """Generated VOC-layout data (this module's generator), made once and cached under ``data.root``."""

    @staticmethod
    def check(cfg: DataConfig) -> str | None:
        for name in ("synthetic_train", "synthetic_val"):
            if getattr(cfg, name) < 1:
                return f"--data.{name} must be >= 1, got {getattr(cfg, name)}"
            if getattr(cfg, name) > 999_999:
                return f"--data.{name} must be at most 999999 (image ids have 6 digits), got {getattr(cfg, name)}"
        if cfg.synthetic_size < 16:
            return f"--data.synthetic_size must be >= 16 pixels, got {cfg.synthetic_size}"
        if cfg.synthetic_size > 4096:
            return f"--data.synthetic_size must be at most 4096 pixels, got {cfg.synthetic_size}"
        if cfg.synthetic_seed < 0:
            return f"--data.synthetic_seed must be >= 0, got {cfg.synthetic_seed}"
        problem = cache_root_problem(cfg.root)
        return f"--data.root: {problem}" if problem else None

    @staticmethod
    def prepare(cfg: DataConfig) -> Path:
        return ensure_synthetic_voc(cfg.root, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_size, cfg.synthetic_seed)


DATASETS.register("synthetic")(SyntheticSource)
