"""Stop a run whose loss became NaN/inf, before a poisoned checkpoint is written."""
from __future__ import annotations

import pytorch_lightning as pl


def record_nonfinite(pl_module: pl.LightningModule, loss) -> None:
    """Remember (on the device, no sync) the first step whose loss was not finite, in the module's
    ``first_nonfinite_step`` buffer (-1: none so far); :class:`FiniteLossGuard` reads it."""
    import torch

    first = pl_module.first_nonfinite_step
    bad = ~torch.isfinite(loss.detach())
    pl_module.first_nonfinite_step = torch.where(bad & (first < 0), torch.full_like(first, pl_module.global_step), first)


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    """The last checkpoint this run wrote or resumed from (``RunCheckpoint`` writes only finite states)."""
    for callback in trainer.callbacks:
        if getattr(callback, "last_good", None) is not None:
            step = getattr(callback, "last_good_step", None)
            return f"{callback.last_good}" + (f" (step {step})" if step is not None else "")
    return "(none: no checkpoint was written before it)"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(pl.Callback):
    """Reads the module's device-side ``first_nonfinite_step`` every ``every_n_steps`` steps and before
    every checkpoint save, so the training step never syncs with the device for this check, yet no
    checkpoint taken after a non-finite loss is ever written: ``last.ckpt`` stays the last good state."""

    def __init__(self, every_n_steps: int = 20):
        self.every_n_steps = max(1, every_n_steps)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(pl_module.first_nonfinite_step.item())
        if step < 0:
            return
        raise NonFiniteLossError(
            f"training loss became non-finite (NaN/inf) at step {step}; stopped at step {trainer.global_step}. "
            f"The last good checkpoint is {last_good_checkpoint(trainer)}. Try a lower --optim.lr, "
            f"--trainer.gradient_clip_val, a larger --data.batch_size, or --trainer.precision=32-true."
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Called while the checkpoint dict is being built, before anything is written to disk.
        self._check(trainer, pl_module)
