"""Effective receptive fields (Luo et al., 2017) of chosen layers, on the fixed validation images.

One heatmap per layer (``--callbacks.erf_layers``: ViT block indices or ResNet stage names; empty = a
spread of 4), each the gradient magnitude of the layer's centre unit with respect to the input pixels,
averaged over the images and normalised to a peak of 1 (see :mod:`utils.receptive_field`). Written to
``<run>/media/erf_e<epoch>.png`` and wandb ``media/erf``. A ViT's first block is already global; a CNN's
field grows with depth and stays far smaller than its theoretical receptive field.
"""
from __future__ import annotations

import math
from typing import Optional

import pytorch_lightning as pl
from torch import Tensor

from callbacks.visual import subplots, VisualisationCallback
from utils.receptive_field import check_erf_layers, effective_receptive_field, erf_model, resolve_layers

__all__ = ["ReceptiveFieldCallback", "check_erf_layers", "plot_receptive_fields"]  # check_erf_layers: for config validation

CMAP = "inferno"
LOG_VMIN = 1e-3  # the log scale shows three decades below the peak


def plot_receptive_fields(maps: dict[str, Tensor], title: str, log_scale: bool = False):
    """A grid of (H, W) maps in [0, 1], one per layer (at most 4 per row), with one shared colour bar."""
    from matplotlib.colors import LogNorm, Normalize

    names = list(maps)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.2 * rows + 0.6), squeeze=False)
    norm = LogNorm(vmin=LOG_VMIN, vmax=1.0) if log_scale else Normalize(vmin=0.0, vmax=1.0)
    image = None
    for ax, name in zip(axes.flat, names):
        erf = maps[name].detach().float().cpu()
        if log_scale:
            erf = erf.clamp(min=LOG_VMIN)
        image = ax.imshow(erf.numpy(), cmap=CMAP, norm=norm, interpolation="nearest")
        ax.set_title(name)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8,
                 label="|∂ centre unit / ∂ input| / max" + (" (log)" if log_scale else ""))
    return fig


class ReceptiveFieldCallback(VisualisationCallback):
    name = "erf"

    def __init__(self, layers: str = "", every_n_epochs: int = 5, num_images: int = 4, log_scale: bool = False):
        super().__init__(every_n_epochs=every_n_epochs, num_images=num_images)
        self.layers = layers
        self.log_scale = log_scale

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        try:
            resolve_layers(pl_module, self.layers)
        except ValueError as err:
            return str(err)
        return None

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor):
        model = erf_model(pl_module)
        maps = {name: effective_receptive_field(model, images, layer) for name, layer in resolve_layers(pl_module, self.layers)}
        h, w = images.shape[-2:]
        title = (f"Effective receptive fields, epoch {trainer.current_epoch} "
                 f"(centre unit, {images.shape[0]} images, {h}×{w} px)")
        return plot_receptive_fields(maps, title, self.log_scale)
