"""Random-number-generator state in checkpoints, so a resumed run draws the same shuffles and
augmentations as the uninterrupted run would have (Lightning does not save it by default)."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


def collect_rng_state() -> dict[str, Any]:
    """Global RNG states of torch (CPU and CUDA), numpy and Python, as tensors and plain lists only, so
    checkpoints stay loadable with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["torch_cuda"] and torch.cuda.is_available() and len(state["torch_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


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
