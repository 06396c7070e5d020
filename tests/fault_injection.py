"""Run ``main.py`` with a real signal delivered to the process at a chosen training step (test helper).

    python tests/fault_injection.py SIGNAL STEP HOOK -- [main.py flags]

SIGNAL is KILL, TERM or INT; it is sent with ``os.kill`` to this very process when the training loop reaches
optimizer step STEP in HOOK (``batch_end``: right after that step's ``on_train_batch_end`` hooks, i.e. after a
step checkpoint of that step; ``batch_start``: at the start of the batch that makes step STEP + 1, i.e. after
every epoch-end hook of the previous epoch; ``val_batch``: after the first validation batch run when the
step counter is STEP, i.e. in the middle of that validation; ``epoch_end``: in the epoch-end hooks of the
epoch whose last step is STEP, after its epoch-end checkpoint and before its epoch means reach the loggers;
``ckpt_write``: in the middle of writing the checkpoint of step STEP — half of its bytes are in the temporary
file when the signal is sent, then the rest is written if the process lives). Placing the signal this way
makes the kill land at an exact, repeatable point; it is still a real signal handled (or not, for KILL) by
the real process.
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

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._maybe(trainer, "val_batch")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._maybe(trainer, "epoch_end")


def signal_during_checkpoint_write(signum: int, step: int) -> None:
    """Make the checkpoint write of step ``step`` send ``signum`` to this process half-way through the file."""
    import io

    import callbacks.checkpointing as checkpointing

    real_save = checkpointing.torch.save
    state = {"sent": False}

    def save(obj, f, *args, **kwargs):
        if state["sent"] or not isinstance(obj, dict) or obj.get("global_step") != step:
            return real_save(obj, f, *args, **kwargs)
        state["sent"] = True
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signum)
        f.write(data[len(data) // 2:])

    checkpointing.torch.save = save


def main() -> int:
    name, step, hook = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    assert sys.argv[4] == "--"
    argv = sys.argv[5:]
    import trainer as trainer_module

    build_callbacks = trainer_module.build_callbacks

    signum = getattr(signal, f"SIG{name}")
    if hook == "ckpt_write":
        signal_during_checkpoint_write(signum, step)

    def with_fault(*args, **kwargs):
        return build_callbacks(*args, **kwargs) + [SignalAt(signum, step, hook)]

    trainer_module.build_callbacks = with_fault
    import main as entry

    return entry.main(argv)


if __name__ == "__main__":
    sys.exit(main())
