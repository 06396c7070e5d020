"""Effective receptive fields (Luo et al., 2017) of chosen layers, on fixed validation images.

One heatmap per layer (``--callbacks.erf_layers``: ViT block indices or ResNet stage names; empty = a
spread of 4), each the gradient magnitude of the layer's centre unit with respect to the input pixels,
averaged over ``--callbacks.erf_images`` validation images (see :mod:`analysis.receptive_field`). Written to
``<run>/media/erf_e<epoch>.png`` and wandb ``media/erf``. The backbone is the one evaluation probes read
(:func:`callbacks.visual.backbone_of`): DINO's teacher, named in the title.

Scale (one shared colour bar either way):

* default, linear, each panel on its own scale. ViT: the map's mean over each patch (the pixel pattern
  inside a patch is the patch embedding's filters, common to all layers), divided by the largest patch
  mean *outside* the patch under the centre token. Through the residual path that patch holds most of the
  gradient (90–91 % in every block of the 15-epoch quickstart model, 85–91 % at random initialisation), so
  a map divided by its peak shows only that patch lit, the same in every layer; divided by the rest, the
  patch saturates (outlined; its share of the gradient is in each panel's title) and what differs between
  layers — which other patches the token draws on, and how much — is visible. ResNet (no such patch): the
  pixel map divided by its peak.
* ``--callbacks.erf_log_scale``: the pixel maps divided by their peaks, log colour scale over three
  decades: the layers in absolute terms (a ViT's centre patch dominates it).

Images: 64 by default (``--callbacks.erf_images``), because the map of a few images is mostly noise. The
noise of one map, per patch outside the centre patch (RMS difference between two maps from disjoint sets
of validation images, / √2, relative to their mean level), on the quickstart model: 28–38 % with 4 images,
17–24 % with 8, 10–19 % with 16, 7–15 % with 32, 7–9 % with 64 (∝ 1/√images; random initialisation or
after its 15 epochs). That model's true pattern is nearly flat, so at 64 images its panels look nearly
uniform; structure well above ~10 % of the level is real.
"""
from __future__ import annotations

import math
from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from callbacks.visual import VisualisationCallback, backbone_of, evaluated_role
from analysis.receptive_field import (
    centre_patch_box, effective_receptive_field, erf_model, resolve_layers,
)
from utils.figures import subplots

__all__ = ["ReceptiveFieldCallback", "plot_receptive_fields"]

CMAP = "inferno"
LOG_VMIN = 1e-3  # the log scale shows three decades below the peak
CHUNK_SIZE = 16  # images per forward/backward pass (bounds the memory of a ResNet-50 at 224 px)

Box = tuple[int, int, int, int]


def patch_means(erf: Tensor, box: Box) -> Tensor:
    """``erf`` averaged over each patch of the grid ``box`` belongs to (patches of the box's size, tiling the
    map from its top-left corner), drawn back at pixel resolution: every pixel shows its patch's mean."""
    top, bottom, left, right = box
    ph, pw = bottom - top, right - left
    h, w = erf.shape
    pooled = F.avg_pool2d(erf[None, None].float(), (ph, pw), ceil_mode=True)[0, 0]
    return pooled.repeat_interleave(ph, 0).repeat_interleave(pw, 1)[:h, :w]


def outside_max(erf: Tensor, box: Box) -> float:
    """The largest value of ``erf`` outside ``box`` (top, bottom, left, right; exclusive ends)."""
    top, bottom, left, right = box
    outside = torch.ones_like(erf, dtype=torch.bool)
    outside[top:bottom, left:right] = False
    return float(erf[outside].max()) if bool(outside.any()) else 0.0


def plot_receptive_fields(maps: dict[str, Tensor], title: str, log_scale: bool = False,
                          boxes: Optional[dict[str, Box]] = None):
    """A grid of (H, W) maps (peak 1), one per layer (at most 4 per row), with one shared colour bar.

    ``boxes`` (ViT: the centre patch per layer, :func:`analysis.receptive_field.centre_patch_box`): on the
    linear scale such a panel shows :func:`patch_means`, divided by the largest patch mean outside the
    centre patch; the centre patch saturates and is outlined, the title gives its share of the gradient.
    Without a box (ResNet) or on the log scale a panel shows the pixel map as it is (peak 1)."""
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    boxes = boxes or {}
    names = list(maps)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.3 * rows + 0.9), squeeze=False)
    norm = LogNorm(vmin=LOG_VMIN, vmax=1.0) if log_scale else Normalize(vmin=0.0, vmax=1.0)
    image = None
    for ax, name in zip(axes.flat, names):
        erf = maps[name].detach().float().cpu()
        label = name
        box = boxes.get(name)
        if box is not None:
            top, bottom, left, right = box
            total = float(erf.sum())
            share = float(erf[top:bottom, left:right].sum()) / total if total > 0 else 0.0
            label = f"{name}: {share:.0%} in its own patch"
            if not log_scale:
                erf = patch_means(erf, box)
                scale = outside_max(erf, box)
                erf = erf / scale if scale > 0 else erf
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                   edgecolor="cyan", linewidth=1.0))
        if log_scale:
            erf = erf.clamp(min=LOG_VMIN)
        image = ax.imshow(erf.numpy(), cmap=CMAP, norm=norm, interpolation="nearest")
        ax.set_title(label, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if log_scale:
        bar = "|∂ unit / ∂ input| / peak (log)"
    elif any(name in boxes for name in names):
        bar = "|∂ unit / ∂ input|, panel scale"
    else:
        bar = "|∂ unit / ∂ input| / peak"
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=bar)
    return fig


class ReceptiveFieldCallback(VisualisationCallback):
    name = "erf"

    def __init__(self, layers: str = "", every_n_epochs: int = 5, num_images: int = 64, log_scale: bool = False):
        super().__init__(every_n_epochs=every_n_epochs, num_images=num_images)
        self.layers = layers
        self.log_scale = log_scale

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        try:
            resolve_layers(backbone_of(pl_module), self.layers)
        except ValueError as err:
            return str(err)
        return None

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor):
        model = erf_model(backbone_of(pl_module))
        maps = {name: effective_receptive_field(model, images, layer, chunk_size=CHUNK_SIZE).cpu()
                for name, layer in resolve_layers(model, self.layers)}
        h, w = images.shape[-2:]
        box = centre_patch_box(model, (h, w))
        boxes = {name: box for name in maps} if box is not None else None
        if self.log_scale:
            scale = "per pixel, each panel / its peak, log scale"
        elif box is not None:
            scale = (f"mean per {box[1] - box[0]}×{box[3] - box[2]} patch, each panel / its largest patch "
                     "outside the centre patch (outlined, saturated)")
        else:
            scale = "per pixel, each panel / its peak"
        role = evaluated_role(pl_module)
        whose = f"the {role}'s " if role else "the "
        title = (f"Effective receptive fields of {whose}centre unit, epoch {trainer.current_epoch}: mean over "
                 f"{images.shape[0]} images of {h}×{w} px\n{scale}")
        return plot_receptive_fields(maps, title, self.log_scale, boxes)
