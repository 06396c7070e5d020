"""The task side of the non-finite loss guard: each task records the first step whose loss was NaN/inf, on the
device, and ``callbacks.finite_loss.FiniteLossGuard`` reads it (so the training step never syncs for it)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch


def record_nonfinite(pl_module: pl.LightningModule, loss) -> None:
    """Remember (on the device, no sync) the first step whose loss was not finite, in the module's
    ``first_nonfinite_step`` buffer (-1: none so far); :class:`callbacks.finite_loss.FiniteLossGuard` reads it."""
    first = pl_module.first_nonfinite_step
    bad = ~torch.isfinite(loss.detach())
    pl_module.first_nonfinite_step = torch.where(bad & (first < 0), torch.full_like(first, pl_module.global_step), first)
