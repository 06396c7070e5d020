"""DINO-style pictures of a ViT's CLS-token attention, every few epochs on fixed validation images.

One figure per block: the last block always (``media/attention_e<epoch>.png``, wandb ``media/attention``)
and each extra block of ``--callbacks.attention_blocks`` (``media/attention_b<block>_e<epoch>.png``, wandb
``media/attention_b<block>``, 0-based block numbers). Each row is one image: the image, the CLS attention of
every head, their mean, the mean map's mass-threshold mask over the image, and every head's mask outlined in
that head's colour (DINO's ``th_attn``, keeping ``--callbacks.attention_keep`` of the attention mass).
Attention probabilities are recomputed from the block weights (:mod:`utils.attention`), so fused attention
stays on for training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytorch_lightning as pl
from torch import Tensor

from callbacks.visual import VisualisationCallback, denormalise, eval_mode, save_figure, subplots, vit_of
from utils.attention import cls_attentions, mass_threshold_masks

CELL_INCHES = 1.7
HEATMAP = "inferno"
MEAN_MASK_COLOUR = "#00e5ff"


class AttentionMapCallback(VisualisationCallback):
    name = "attention"

    def __init__(self, every_n_epochs: int = 5, num_images: int = 4, blocks: Sequence[int] = (), keep: float = 0.6):
        super().__init__(every_n_epochs=every_n_epochs, num_images=num_images)
        self.blocks = [int(b) for b in blocks]
        self.keep = keep

    # -- checks and naming -------------------------------------------------------------------------
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        vit = vit_of(pl_module)
        if vit is None:
            return "they need a ViT backbone (this run's backbone is a CNN, which has no attention)"
        if getattr(vit, "cls_token", None) is None:
            return "they show the CLS token's attention, and this ViT has no class token"
        depth = len(vit.blocks)
        bad = [b for b in self.blocks if not -depth <= b < depth]
        if bad:
            return (f"--callbacks.attention_blocks: block(s) {', '.join(map(str, bad))} out of range for a "
                    f"{depth}-block ViT (valid: 0..{depth - 1}, or -{depth}..-1 counted from the end)")
        if not 0.0 < self.keep <= 1.0:
            return f"--callbacks.attention_keep={self.keep}: must be a fraction in (0, 1]"
        return None

    def block_indices(self, depth: int) -> list[int]:
        """The last block first, then the requested others (0-based, deduplicated, ascending)."""
        last = depth - 1
        return [last] + sorted({b % depth for b in self.blocks if -depth <= b < depth} - {last})

    def stem(self, block: int, depth: int, tag: str) -> str:
        """``attention_<tag>`` for the last block, ``attention_b<block:02d>_<tag>`` for the others."""
        return f"{self.name}_{tag}" if block == depth - 1 else f"{self.name}_b{block:02d}_{tag}"

    # -- drawing -----------------------------------------------------------------------------------
    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor) -> list[tuple[int, object]]:
        """(block, figure) for the last block and each requested block, from one forward pass."""
        vit = vit_of(pl_module)
        depth = len(vit.blocks)
        blocks = self.block_indices(depth)
        maps = cls_attentions(vit, images, blocks)
        shown = images.detach().float().cpu()
        return [(b, attention_figure(shown, maps[b].cpu(), block=b, depth=depth, epoch=trainer.current_epoch,
                                     keep=self.keep)) for b in blocks]

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor):
        """The last block's figure (``render`` draws every block)."""
        vit = vit_of(pl_module)
        depth = len(vit.blocks)
        maps = cls_attentions(vit, images, [depth - 1])
        return attention_figure(images.detach().float().cpu(), maps[depth - 1].cpu(), block=depth - 1, depth=depth,
                                epoch=trainer.current_epoch, keep=self.keep)

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> Optional[Path]:
        with eval_mode(pl_module):
            figures = self.figures(trainer, pl_module, self.images(trainer, pl_module.device))
        depth = len(vit_of(pl_module).blocks)
        main_path = None
        for block, figure in figures:
            path = save_figure(trainer, figure, self.stem(block, depth, tag))
            if block == depth - 1:
                main_path = path
        return main_path


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a patch grid (..., h, w) to (..., height, width) (exact patch blocks)."""
    rows, cols = grid.shape[-2:]
    return np.repeat(np.repeat(grid, height // rows, axis=-2), width // cols, axis=-1)


def _heatmap(ax, grid: np.ndarray, height: int, width: int) -> None:
    """One attention map at image size, min–max scaled (as DINO shows them), with its peakiness below."""
    low, high = float(grid.min()), float(grid.max())
    ax.imshow(_upsample(grid, height, width), cmap=HEATMAP, vmin=low, vmax=max(high, low + 1e-12),
              interpolation="nearest")
    mean = float(grid.mean())
    ax.set_xlabel(f"max/mean {high / mean:.3g}" if mean > 0 else "no mass", fontsize=8, labelpad=2)


def attention_figure(images: Tensor, attn: Tensor, block: int, depth: int, epoch: int, keep: float = 0.6):
    """The DINO picture for one block.

    ``images``: (B, 3, H, W) ImageNet-normalised; ``attn``: (B, heads, H/p, W/p) CLS attention
    (:func:`utils.attention.cls_attention`). Each heat map is scaled from 0 to its own maximum.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import ListedColormap

    pictures = denormalise(images).permute(0, 2, 3, 1).numpy()
    batch, heads = attn.shape[:2]
    height, width = pictures.shape[1:3]
    attn = attn.float()
    mean = attn.mean(dim=1)
    mean_masks = mass_threshold_masks(mean, keep).numpy()
    head_masks = mass_threshold_masks(attn, keep).numpy()
    attn_np, mean_np = attn.numpy(), mean.numpy()
    palette = matplotlib.colormaps["tab10" if heads <= 10 else "tab20"]
    head_colours = [palette(h % palette.N) for h in range(heads)]

    columns = 1 + heads + 3
    figure, axes = subplots(batch, columns, figsize=(CELL_INCHES * columns, CELL_INCHES * batch + 0.6),
                                squeeze=False, layout="constrained")
    which = f"block {block} (the last of {depth})" if block == depth - 1 else f"block {block} (of 0..{depth - 1})"
    figure.suptitle(f"CLS-token attention · {which} · epoch {epoch}\n"
                    f"each map scaled from its min to its max (below it: max / mean) · "
                    f"masks keep {keep:.0%} of the attention mass", fontsize=10)
    for row in range(batch):
        picture = pictures[row]
        ax = axes[row, 0]
        ax.imshow(picture)
        for col, grid in enumerate(list(attn_np[row]) + [mean_np[row]], start=1):
            _heatmap(axes[row, col], grid, height, width)
        # the mean map's mask: the image dimmed outside it, outlined
        mask = _upsample(mean_masks[row], height, width)
        ax = axes[row, 2 + heads]
        ax.imshow(np.where(mask[..., None], picture, 0.3 * picture))
        if mask.any() and not mask.all():
            ax.contour(mask.astype(float), levels=[0.5], colors=[MEAN_MASK_COLOUR], linewidths=1.5)
        # every head's mask, outlined and lightly filled in that head's colour
        ax = axes[row, 3 + heads]
        ax.imshow(0.6 * picture + 0.4 * picture.mean(axis=-1, keepdims=True))
        for h in range(heads):
            mask = _upsample(head_masks[row, h], height, width)
            if not mask.any():
                continue
            ax.imshow(np.ma.masked_where(~mask, np.ones_like(mask, dtype=float)),
                      cmap=ListedColormap([head_colours[h]]), alpha=0.2, vmin=0, vmax=1, interpolation="nearest")
            if not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=[head_colours[h]], linewidths=1.5)
    titles = (["image"] + [f"head {h}" for h in range(heads)] + ["mean of heads", f"mean: {keep:.0%} mask",
                                                                   "head masks"])
    for col, title in enumerate(titles):
        colour = head_colours[col - 1] if 1 <= col <= heads else "black"
        axes[0, col].set_title(title, fontsize=10, color=colour, fontweight="bold" if colour != "black" else None)
    for row in range(batch):
        axes[row, 0].set_ylabel(f"image {row}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    return figure
