"""The Barlow Twins cross-correlation matrix: the "is it converging" picture the loss alone hides.

Heatmaps of the latest training matrix and the epoch-averaged validation matrix on a fixed colour scale
(≈0 cyan-blue, 1 red, as in the report) with a colour bar, also once before training starts (a
DINO-initialised backbone shows its near-identity start); for wide projectors the top-left k×k block at
full resolution beside the whole matrix. Scalars at every log step: mean diagonal, mean |off-diagonal|
and the fraction of diagonal entries above 0.9. With the dense term on, its matrices and scalars
(``cc_dense/*``) too.
"""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from callbacks.visual import eval_mode, save_figure, subplots, wait_for_pictures
from models.losses import barlow_twins_loss

# Fixed scale: 0 sits at the cyan-blue third of "jet", 1 at its red end; negative values stay blue.
VMIN, VMAX, CMAP = -0.5, 1.0, "jet"


def convergence_scalars(c: Tensor) -> dict[str, Tensor]:
    """Device tensors (no host sync): mean diagonal, mean |off-diagonal|, fraction of diagonal > 0.9."""
    d = c.shape[0]
    diag = torch.diagonal(c)
    off = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:]
    return {"diag_mean": diag.mean(), "offdiag_abs_mean": off.abs().mean(), "diag_above_0.9": (diag > 0.9).float().mean()}


def plot_cross_correlation(matrices: dict[str, Tensor], title: str, block: int = 0):
    """One column per matrix (e.g. train, val); a second row with the top-left block when asked."""

    names = list(matrices)
    dims = [m.shape[0] for m in matrices.values()]
    show_block = block > 0 and any(d > block for d in dims)
    rows = 2 if show_block else 1
    fig, axes = subplots(rows, len(names), figsize=(4.6 * len(names), 4.2 * rows), squeeze=False)
    image = None
    for j, name in enumerate(names):
        c = matrices[name].detach().float().cpu().numpy()
        image = axes[0, j].imshow(c, cmap=CMAP, vmin=VMIN, vmax=VMAX, interpolation="nearest")
        axes[0, j].set_title(f"{name}: {c.shape[0]}×{c.shape[0]}")
        if show_block:
            k = min(block, c.shape[0])
            axes[1, j].imshow(c[:k, :k], cmap=CMAP, vmin=VMIN, vmax=VMAX, interpolation="nearest")
            axes[1, j].set_title(f"{name}: top-left {k}×{k}")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="cross-correlation")
    return fig


class CrossCorrelationCallback(pl.Callback):
    name = "cross_correlation"

    def __init__(self, block: int = 64, every_n_epochs: int = 5):
        self.block = block
        self.every_n_epochs = max(1, every_n_epochs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Logged (as device tensors, no sync) every step; Lightning writes them every log_every_n_steps.
        c: Optional[Tensor] = getattr(pl_module, "last_cross_correlation", None)
        if c is None:
            return
        scalars = {f"cc/{k}": v for k, v in convergence_scalars(c).items()}
        dense: Optional[Tensor] = getattr(pl_module, "last_dense_cross_correlation", None)
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
        matrices = {}
        if getattr(pl_module, "last_cross_correlation", None) is not None:
            matrices["train (latest batch)"] = pl_module.last_cross_correlation
        if getattr(pl_module, "val_cross_correlation", None) is not None:
            matrices["val (epoch mean)"] = pl_module.val_cross_correlation
        if getattr(pl_module, "last_dense_cross_correlation", None) is not None:
            matrices["dense train (latest)"] = pl_module.last_dense_cross_correlation
        if getattr(pl_module, "val_dense_cross_correlation", None) is not None:
            matrices["dense val (epoch mean)"] = pl_module.val_dense_cross_correlation
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
