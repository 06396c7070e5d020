"""Run ``main.py`` with a real signal delivered to the process at a chosen training step (test helper).

    python tests/fault_injection.py SIGNAL STEP HOOK -- [main.py flags]

SIGNAL is KILL, TERM or INT; it is sent with ``os.kill`` to this very process when the training loop reaches
optimizer step STEP in HOOK (``batch_end``: right after that step's ``on_train_batch_end`` hooks, i.e. after a
step checkpoint of that step; ``batch_start``: at the start of the batch that makes step STEP + 1, i.e. after
every epoch-end hook of the previous epoch). Placing the signal this way makes the kill land at an exact,
repeatable point; it is still a real signal handled (or not, for KILL) by the real process.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytorch_lightning as pl  # noqa: E402


class SignalAt(pl.callbacks.Checkpoint):
    """A Checkpoint subclass only so that Lightning orders it after the real checkpoint callbacks: the signal
    comes after their hooks of the same step."""

    def __init__(self, signum: int, step: int, hook: str):
        self.signum, self.step, self.hook, self.sent = signum, step, hook, False

    def _maybe(self, trainer, hook: str) -> None:
        if not self.sent and hook == self.hook and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe(trainer, "batch_end")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe(trainer, "batch_start")


def main() -> int:
    name, step, hook = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    assert sys.argv[4] == "--"
    argv = sys.argv[5:]
    import trainer as trainer_module

    build_callbacks = trainer_module.build_callbacks

    def with_fault(*args, **kwargs):
        return build_callbacks(*args, **kwargs) + [SignalAt(getattr(signal, f"SIG{name}"), step, hook)]

    trainer_module.build_callbacks = with_fault
    import main as entry

    return entry.main(argv)


if __name__ == "__main__":
    sys.exit(main())
