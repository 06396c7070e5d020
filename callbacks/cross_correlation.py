"""The Barlow Twins cross-correlation matrix: the "is it converging" picture the loss alone hides.

Heatmaps of the latest training matrix and the epoch-averaged validation matrix on a fixed diverging colour
scale centred on 0 (-1 blue, 0 white, 1 red; the same range in every picture, so a diagonal of 0.5 is visibly
half way to the target) with a colour bar, also once before training starts (a
DINO-initialised backbone shows its near-identity start); for wide projectors the top-left k×k block at
full resolution beside the whole matrix. Every matrix cell gets a whole number of pixels (k × k, panels of
about PANEL_PX pixels), so the picture never aliases (a 512×512 matrix drawn into fewer pixels shows moiré
and a broken diagonal); a matrix wider than MAX_CELLS is shown as means of f × f blocks, each diagonal cell
the mean of the diagonal entries it holds, which its title says. Scalars at every logging step (only those): mean diagonal, mean |off-diagonal|
and the fraction of diagonal entries above 0.9. With the dense term on, its matrices and scalars
(``cc_dense/*``) too.
"""
from __future__ import annotations

import math
from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from callbacks.visual import eval_mode, save_figure, wait_for_pictures
from models.losses import barlow_twins_loss
from utils.step_logging import is_logging_step

# Fixed diverging scale centred on 0 over the whole range a correlation can take: uncorrelated is white, the
# target diagonal (1) dark red, anti-correlation blue. A sequential map such as "jet" made 0.47 look like
# background and hid a half-learnt diagonal.
VMIN, VMAX, CMAP = -1.0, 1.0, "RdBu_r"
MAX_CELLS = 512
"""Widest matrix drawn cell by cell (one pixel or more each); wider ones are pooled to at most this many cells."""
PANEL_PX = 384
"""Target side of a matrix panel in pixels: small matrices get k × k pixels per cell, k = PANEL_PX // side."""
DPI = 100  # the resolution callbacks.visual.save_figure writes at: the layout below is in its pixels


def convergence_scalars(c: Tensor) -> dict[str, Tensor]:
    """Device tensors (no host sync): mean diagonal, mean |off-diagonal|, fraction of diagonal > 0.9."""
    d = c.shape[0]
    diag = torch.diagonal(c)
    off = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:]
    return {"diag_mean": diag.mean(), "offdiag_abs_mean": off.abs().mean(), "diag_above_0.9": (diag > 0.9).float().mean()}


def pool_for_display(c: Tensor, max_cells: int = MAX_CELLS) -> tuple[Tensor, int]:
    """(matrix to draw, block size f). ``c`` itself (f = 1) when its side d ≤ ``max_cells``; otherwise the means
    of f × f blocks, f = ceil(d / max_cells) (the last, ragged block averages the entries it has), except each
    diagonal cell, which is the mean of the *diagonal* entries of its block — a plain block mean would dilute
    the diagonal by f."""
    c = c.detach().float().cpu()
    d = c.shape[0]
    if d <= max_cells:
        return c, 1
    f = math.ceil(d / max_cells)
    n = math.ceil(d / f)
    pad = n * f - d
    sums = F.pad(c, (0, pad, 0, pad)).view(n, f, n, f).sum(dim=(1, 3))
    counts = F.pad(torch.ones(d), (0, pad)).view(n, f).sum(dim=1)
    pooled = sums / torch.outer(counts, counts)
    idx = torch.arange(n)
    pooled[idx, idx] = F.pad(torch.diagonal(c), (0, pad)).view(n, f).sum(dim=1) / counts
    return pooled, f


def _pixels(shown: Tensor) -> int:
    """Pixels per drawn cell (each way): a whole number, about PANEL_PX per panel."""
    return max(1, PANEL_PX // shown.shape[0])


def plot_cross_correlation(matrices: dict[str, Tensor], title: str, block: int = 0):
    """One column per matrix (e.g. train, val); a second row with the top-left block when asked. Laid out in
    pixels (at DPI) so that each drawn cell covers exactly k × k pixels: no resampling, no aliasing."""
    from matplotlib.figure import Figure

    names = list(matrices)
    dims = [m.shape[0] for m in matrices.values()]
    show_block = block > 0 and any(d > block for d in dims)
    panels: list[list[tuple[Tensor, str]]] = [[], []]
    for name, c in matrices.items():
        d = c.shape[0]
        shown, f = pool_for_display(c)
        label = f"{name}: {d}×{d}"
        if f > 1:
            label += f"\nshown as {shown.shape[0]}×{shown.shape[0]} means of {f}×{f} blocks (diagonal: its entries)"
        panels[0].append((shown, label))
        if show_block:
            k = min(block, d)
            panels[1].append((c.detach().float().cpu()[:k, :k], f"{name}: top-left {k}×{k}"))
    rows = [row for row in panels if row]
    rows = [[(m, f"{label}, {_pixels(m)} px per cell") for m, label in row] for row in rows]
    sides = [[_pixels(m) * m.shape[0] for m, _ in row] for row in rows]
    cell = max(max(row) for row in sides)
    left, gap, title_h, top, bottom, bar_gap, bar_w, bar_label = 10, 30, 44, 60, 10, 24, 18, 70
    width = left + len(names) * cell + (len(names) - 1) * gap + bar_gap + bar_w + bar_label
    height = top + len(rows) * (title_h + cell) + bottom
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    image = None
    for i, row in enumerate(rows):
        y = height - top - (i + 1) * (title_h + cell)  # bottom edge of this row's panel area
        for j, ((shown, label), side) in enumerate(zip(row, sides[i])):
            x = left + j * (cell + gap) + (cell - side) // 2
            ax = fig.add_axes((x / width, (y + cell - side) / height, side / width, side / height))
            image = ax.imshow(shown.numpy(), cmap=CMAP, vmin=VMIN, vmax=VMAX, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=9)
    bar = fig.add_axes(((width - bar_label - bar_w) / width, (bottom + 0.1 * (height - top - bottom)) / height,
                        bar_w / width, 0.8 * (height - top - bottom) / height))
    fig.colorbar(image, cax=bar, label="cross-correlation")
    fig.suptitle(title, y=1 - 18 / height, fontsize=10)
    return fig


class CrossCorrelationCallback(pl.Callback):
    name = "cross_correlation"

    def __init__(self, block: int = 64, every_n_epochs: int = 5):
        self.block = block
        self.every_n_epochs = max(1, every_n_epochs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Step values only (no epoch mean): computed and logged (device tensors, no sync) on the steps whose
        # values Lightning writes (every log_every_n_steps), not on the others, where they would be discarded.
        if not is_logging_step(trainer):
            return
        # the interface of lightningmodules/base.py: None until the module's first step / without a dense term
        c: Optional[Tensor] = pl_module.last_cross_correlation
        if c is None:
            return
        scalars = {f"cc/{k}": v for k, v in convergence_scalars(c).items()}
        dense: Optional[Tensor] = pl_module.last_dense_cross_correlation
        if dense is not None:  # the dense term's own matrix (barlow.dense_weight > 0)
            scalars.update({f"cc_dense/{k}": v for k, v in convergence_scalars(dense).items()})
        pl_module.log_dict(scalars, on_step=True, on_epoch=False)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and trainer.current_epoch == 0 and trainer.global_step == 0:
            c = self._initial_matrix(trainer, pl_module)
            if c is not None:
                self._save(trainer, {"val (before training)": c}, "start", "before training")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs - 1
        if not trainer.is_global_zero or not (epoch % self.every_n_epochs == 0 or last):
            return
        candidates = {"train (latest batch)": pl_module.last_cross_correlation,
                      "val (epoch mean)": pl_module.val_cross_correlation,
                      "dense train (latest)": pl_module.last_dense_cross_correlation,
                      "dense val (epoch mean)": pl_module.val_dense_cross_correlation}
        matrices = {name: c for name, c in candidates.items() if c is not None}
        if matrices:
            self._save(trainer, matrices, f"e{epoch:03d}", f"epoch {epoch}, step {trainer.global_step}")

    def _initial_matrix(self, trainer, pl_module) -> Optional[Tensor]:
        dm = trainer.datamodule
        if dm is None or getattr(dm, "val_set", None) is None or len(dm.val_set) < 2:
            return None
        # One validation batch read in this process (no DataLoader workers to start), same seeded views
        # as the validation loader's first batch, finished on the CPU in either augmentation mode.
        x1, x2 = dm.validation_views(dm.batch_size)[:2]
        with torch.no_grad(), eval_mode(pl_module):
            z1, z2 = pl_module.embed(x1.to(pl_module.device), x2.to(pl_module.device))
            _, c = barlow_twins_loss(z1, z2, pl_module.cfg.barlow.lambd)
        return c

    def _save(self, trainer, matrices: dict[str, Tensor], tag: str, when: str) -> None:
        diag = {name: float(torch.diagonal(c).mean()) for name, c in matrices.items()}
        title = f"Barlow Twins cross-correlation, {when} — mean diagonal " + ", ".join(f"{n.split(' (')[0]} {v:.2f}" for n, v in diag.items())
        fig = plot_cross_correlation(matrices, title, self.block)
        save_figure(trainer, fig, f"{self.name}_{tag}")

    def on_train_end(self, trainer, pl_module) -> None:
        wait_for_pictures()
