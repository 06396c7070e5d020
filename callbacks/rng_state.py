"""Random-number-generator state in checkpoints, so a resumed run draws the same shuffles and
augmentations as the uninterrupted run would have (Lightning does not save it by default)."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from utils.rng import collect_rng_state, restore_rng_state


class RNGStateCheckpoint(pl.Callback):
    """Saves the RNG state with every checkpoint and restores it on resume."""

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        # Restored here rather than in load_state_dict: Lightning draws random numbers between restoring
        # callbacks and the first batch; the uninterrupted run's state at this point equals the saved one.
        pending, self._pending = getattr(self, "_pending", None), None
        # Only when fit() resumes a checkpoint: the tuner's temporary checkpoints load callback states too.
        if pending is not None and trainer.ckpt_path is not None:
            restore_rng_state(pending)
