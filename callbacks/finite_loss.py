"""Stop a run whose loss became NaN/inf, before a poisoned checkpoint is written."""
from __future__ import annotations

import pytorch_lightning as pl

# The tasks record the first non-finite step with this (lightningmodules sit below callbacks); re-exported here.
from lightningmodules.nonfinite import record_nonfinite  # noqa: F401


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
        # CUDA: the periodic check reads a copy of the step made at the previous check (pinned host memory,
        # copied asynchronously, long finished by now), so even that check never waits for the device; it
        # reports at most one interval later. Epoch ends and checkpoint saves read the device value itself.
        self._host_copy = None
        self._copied = None  # torch.cuda.Event recorded after the asynchronous copy

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_recorded(trainer, int(pl_module.first_nonfinite_step.item()))

    def _raise_if_recorded(self, trainer: pl.Trainer, step: int) -> None:
        if step < 0:
            return
        raise NonFiniteLossError(
            f"training loss became non-finite (NaN/inf) at step {step}; stopped at step {trainer.global_step}. "
            f"The last good checkpoint is {last_good_checkpoint(trainer)}. Try a lower --optim.lr, "
            f"--trainer.gradient_clip_val, a larger --data.batch_size, or --trainer.precision=32-true."
        )

    def _check_without_waiting(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch

        recorded = pl_module.first_nonfinite_step
        if not recorded.is_cuda:
            self._check(trainer, pl_module)  # a host tensor: reading it waits for nothing
            return
        if self._copied is not None:
            self._copied.synchronize()  # the copy enqueued every_n_steps steps ago
            self._raise_if_recorded(trainer, int(self._host_copy.item()))
        if self._host_copy is None:
            self._host_copy = torch.empty((), dtype=recorded.dtype, pin_memory=True)
            self._copied = torch.cuda.Event()
        self._host_copy.copy_(recorded, non_blocking=True)
        self._copied.record()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._check_without_waiting(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Called while the checkpoint dict is being built, before anything is written to disk.
        self._check(trainer, pl_module)
