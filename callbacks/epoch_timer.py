"""Wall time per training epoch (``time/train_epoch_s``), logged beside the metrics."""
from __future__ import annotations

import time

import pytorch_lightning as pl


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self._start: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # A run resumed mid-epoch from a step checkpoint starts without on_train_epoch_start for that epoch.
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Host time only: no device sync is forced, so on a GPU the last queued kernels may be outside it.
        # (a resumed partial epoch reports the time of its resumed part)
        pl_module.log("time/train_epoch_s", time.perf_counter() - self._start, on_step=False, on_epoch=True)
