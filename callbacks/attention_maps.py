"""DINO-style pictures of a ViT's CLS-token attention, every few epochs on fixed validation images.

One figure per block: the last block always (``media/attention_e<epoch>.png``, wandb ``media/attention``)
and each extra block of ``--callbacks.attention_blocks`` (``media/attention_b<block>_e<epoch>.png``, wandb
``media/attention_b<block>``, 0-based block numbers). Each row is one image: the image, the CLS attention of
every head, their mean, the mean map's mass-threshold mask over the image, and every head's mask outlined in
that head's colour (DINO's ``th_attn``, keeping ``--callbacks.attention_keep`` of the attention mass).
Attention probabilities are recomputed from the block weights (:mod:`analysis.attention`), so fused attention
stays on for training.

A module with several backbones (:func:`callbacks.visual.named_backbones`; DINO: teacher and student) gets
one set of figures per backbone, the role in the name: ``media/attention_teacher_e<epoch>.png`` (wandb
``media/attention_teacher``), ``attention_student_b<block>_e<epoch>.png``, and so on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from callbacks.visual import (VisualisationCallback, cls_attention_problem, denormalise, eval_mode, named_backbones,
                              save_figure, vit_in)
from analysis.attention import cls_attentions, mass_threshold_masks, peak_to_mean, relative_to_uniform
from utils.figures import subplots

CELL_INCHES = 1.7
HEATMAP = "inferno"
MEAN_MASK_COLOUR = "#00e5ff"
MIN_SCALE_TOP = 2.0
"""The common colour scale of the heat maps runs (logarithmically) from 1/top to top times uniform attention,
top at least this: a figure of near-flat maps (all ≈1) shows them as one flat mid colour instead of stretching
noise to full contrast."""


class AttentionMapCallback(VisualisationCallback):
    name = "attention"

    def __init__(self, every_n_epochs: int = 5, num_images: int = 4, blocks: Sequence[int] = (), keep: float = 0.6):
        super().__init__(every_n_epochs=every_n_epochs, num_images=num_images)
        self.blocks = [int(b) for b in blocks]
        self.keep = keep

    # -- checks and naming -------------------------------------------------------------------------
    def vits(self, pl_module: pl.LightningModule) -> dict[str, object]:
        """role → the ViT of each backbone (:func:`callbacks.visual.named_backbones`; None for a CNN)."""
        return {role: vit_in(backbone) for role, backbone in named_backbones(pl_module).items()}

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        vits = self.vits(pl_module)
        if not vits:
            return cls_attention_problem(None)
        for role, vit in vits.items():
            problem = cls_attention_problem(vit)
            if problem:
                return f"{role} backbone: {problem}" if role else problem
        depth = min(len(vit.blocks) for vit in vits.values())
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

    def stem(self, block: int, depth: int, tag: str, role: str = "") -> str:
        """``attention[_<role>]_<tag>`` for the last block, ``attention[_<role>]_b<block:02d>_<tag>`` for the
        others (no role for a module with one backbone)."""
        name = f"{self.name}_{role}" if role else self.name
        return f"{name}_{tag}" if block == depth - 1 else f"{name}_b{block:02d}_{tag}"

    # -- drawing -----------------------------------------------------------------------------------
    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor,
                role: str = "") -> list[tuple[int, object]]:
        """(block, figure) of the ``role`` backbone for the last block and each requested block, from one
        forward pass."""
        vit = self.vits(pl_module)[role]
        depth = len(vit.blocks)
        blocks = self.block_indices(depth)
        maps = cls_attentions(vit, images, blocks)
        shown = images.detach().float().cpu()
        return [(b, attention_figure(shown, maps[b].cpu(), block=b, depth=depth, epoch=trainer.current_epoch,
                                     keep=self.keep, role=role)) for b in blocks]

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor):
        """The last block's figure of the first backbone (``render`` draws every block of every backbone)."""
        role, vit = next(iter(self.vits(pl_module).items()))
        depth = len(vit.blocks)
        maps = cls_attentions(vit, images, [depth - 1])
        return attention_figure(images.detach().float().cpu(), maps[depth - 1].cpu(), block=depth - 1, depth=depth,
                                epoch=trainer.current_epoch, keep=self.keep, role=role)

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> Optional[Path]:
        """Every figure of every backbone; returns the path of the first backbone's last-block figure."""
        images = self.images(trainer, pl_module.device)
        main_path = None
        for role, vit in self.vits(pl_module).items():
            with eval_mode(pl_module):
                figures = self.figures(trainer, pl_module, images, role)
            depth = len(vit.blocks)
            for block, figure in figures:
                path = save_figure(trainer, figure, self.stem(block, depth, tag, role))
                if block == depth - 1 and main_path is None:
                    main_path = path
        return main_path


def log_position(relative: np.ndarray, top: float) -> np.ndarray:
    """Colour-map position in [0, 1] of attention relative to uniform on the log scale 1/top .. top: 1 (uniform)
    at 0.5, top at 1, 1/top and below (and 0) at 0."""
    with np.errstate(divide="ignore"):
        position = 0.5 + 0.5 * np.log(relative) / np.log(top)
    return np.clip(np.nan_to_num(position, nan=0.0, neginf=0.0), 0.0, 1.0)


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a patch grid to the image size (each patch a solid block)."""
    return np.kron(grid, np.ones((height // grid.shape[0], width // grid.shape[1]), dtype=grid.dtype))


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the mask's boundary), without contour tracing."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[k:k + 2], 16) / 255 for k in (1, 3, 5)])


def attention_figure(images: Tensor, attn: Tensor, block: int, depth: int, epoch: int, keep: float = 0.6,
                     role: str = ""):
    """The DINO picture for one block, composed into one RGB canvas drawn with a single ``imshow`` (a grid
    of dozens of matplotlib axes costs seconds per figure; this costs a fraction of that).

    ``images``: (B, 3, H, W) ImageNet-normalised; ``attn``: (B, heads, H/p, W/p) CLS attention
    (:func:`analysis.attention.cls_attention`). Every heat map shows attention relative to uniform (value /
    the map's mean, :func:`analysis.attention.relative_to_uniform`) on one logarithmic colour scale shared by
    the whole figure, centred on 1 (uniform) and running from 1/top to top, top = max(MIN_SCALE_TOP, the
    largest value drawn), with a colour bar: flat maps are one flat mid colour, peaked ones stand out, a single
    very peaked map does not blacken all others, and maps can be compared with each other. Each panel also prints its flatness, max / mean
    (≈1: uniform attention). ``role`` (e.g. ``teacher``) names the backbone in the title when a module has
    several.
    """
    import matplotlib

    pictures = denormalise(images).permute(0, 2, 3, 1).numpy()
    batch, heads = attn.shape[:2]
    height, width = pictures.shape[1:3]
    attn = attn.float()
    mean = attn.mean(dim=1)
    mean_masks = mass_threshold_masks(mean, keep).numpy()
    head_masks = mass_threshold_masks(attn, keep).numpy()
    relative = relative_to_uniform(torch.cat([attn, mean[:, None]], dim=1))  # (B, heads + 1, h, w)
    flatness = peak_to_mean(torch.cat([attn, mean[:, None]], dim=1)).numpy()
    top = max(MIN_SCALE_TOP, float(relative.max()))
    relative_np = relative.numpy()
    cmap = matplotlib.colormaps[HEATMAP]
    palette = matplotlib.colormaps["tab10" if heads <= 10 else "tab20"]
    head_colours = [np.array(palette(h % palette.N)[:3]) for h in range(heads)]
    cyan = _hex_rgb(MEAN_MASK_COLOUR)

    columns = 1 + heads + 3
    gap = max(2, width // 16)
    canvas = np.ones((batch * (height + gap) - gap, columns * (width + gap) - gap, 3))
    ratios: list[tuple[int, int, str]] = []

    def put(row: int, col: int, tile: np.ndarray) -> None:
        top, left = row * (height + gap), col * (width + gap)
        canvas[top:top + height, left:left + width] = tile

    for row in range(batch):
        picture = pictures[row]
        put(row, 0, picture)
        for col, grid in enumerate(relative_np[row], start=1):
            put(row, col, cmap(log_position(_upsample(grid, height, width), top))[..., :3])
            ratios.append((row, col, f"{flatness[row, col - 1]:.3g}" if flatness[row, col - 1] > 0 else "no mass"))
        mask = _upsample(mean_masks[row], height, width)
        tile = np.where(mask[..., None], picture, 0.3 * picture)
        tile[_outline(mask)] = cyan
        put(row, 2 + heads, tile)
        tile = 0.6 * picture + 0.4 * picture.mean(axis=-1, keepdims=True)
        for h in range(heads):
            mask = _upsample(head_masks[row, h], height, width)
            tile[mask] = 0.8 * tile[mask] + 0.2 * head_colours[h]
            tile[_outline(mask)] = head_colours[h]
        put(row, 3 + heads, tile)

    cell = CELL_INCHES
    figure, ax = subplots(1, 1, figsize=(cell * columns, cell * batch * 1.12 + 0.9))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    titles = ["image"] + [f"head {h}" for h in range(heads)] + ["mean of heads", f"mean: {keep:.0%} mask", "head masks"]
    for col, title in enumerate(titles):
        colour = head_colours[col - 1] if 1 <= col <= heads else "black"
        ax.text(col * (width + gap) + width / 2, -gap, title, ha="center", va="bottom", fontsize=9, color=colour,
                fontweight="bold" if 1 <= col <= heads else None)
    for row in range(batch):
        ax.text(-gap, row * (height + gap) + height / 2, f"image {row}", ha="right", va="center", fontsize=8, rotation=90)
    for row, col, text in ratios:  # inside the panel, readable on any colour
        ax.text(col * (width + gap) + 1, row * (height + gap) + 1, f"max/mean {text}", ha="left", va="top",
                fontsize=7, color="white", bbox=dict(facecolor="black", alpha=0.55, pad=1.0, linewidth=0))
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    bar = figure.colorbar(ScalarMappable(LogNorm(1.0 / top, top), cmap), ax=ax, fraction=0.012, pad=0.01)
    bar.set_label("attention / uniform (1 = flat), log scale", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    which = f"block {block} (the last of {depth})" if block == depth - 1 else f"block {block} (of 0..{depth - 1})"
    whose = f"{role} " if role else ""
    figure.suptitle(f"{whose}CLS-token attention · {which} · epoch {epoch}\n"
                    f"one colour scale for every map: attention relative to uniform, 1/{top:.3g} to {top:.3g} (log) · "
                    f"masks keep {keep:.0%} of the attention mass", fontsize=10)
    figure.subplots_adjust(left=0.03, right=0.99, bottom=0.02, top=1 - 0.9 / (cell * batch * 1.12 + 0.9))
    return figure
