"""``python main.py`` for the multi-node tests, plus one callback that records what the comparison needs.

Run as a script (``torchrun ... tests/multinode_entry.py FLAGS``, or under a simulated SLURM environment): with
``VITSSL_TEST_RECORD=DIR`` each process saves ``DIR/rank<global rank>.pt`` holding its loss and its gradients
(after DDP's all-reduce) at every step, and its parameters at the end. With ``VITSSL_TEST_KILL_AT_STEP=N``
the second node (global rank 1) vanishes when step N is about to start: SIGKILL to its torchrun agent and to
itself, as a machine that goes away (a kill from outside would race with steps that take milliseconds).
Everything else is main.py's own path.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402


class StepRecord(pl.Callback):
    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.record: dict = {"loss": [], "grads": []}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.record["grads"].append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                                     if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["loss"].append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        self.record["params"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.record["world_size"] = trainer.world_size
        self.record["num_nodes"] = trainer.num_nodes
        self.record["node_rank"] = trainer.node_rank
        self.record["pid"] = os.getpid()
        torch.save(self.record, self.folder / f"rank{trainer.global_rank}.pt")


class NodeFailure(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            import signal

            os.kill(os.getppid(), signal.SIGKILL)  # the torchrun agent of this node
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    import main
    import trainer

    extra: list[pl.Callback] = []
    if os.environ.get("VITSSL_TEST_RECORD"):
        extra.append(StepRecord(os.environ["VITSSL_TEST_RECORD"]))
    if os.environ.get("VITSSL_TEST_KILL_AT_STEP"):
        extra.append(NodeFailure(int(os.environ["VITSSL_TEST_KILL_AT_STEP"])))
    build_callbacks = trainer.build_callbacks
    trainer.build_callbacks = lambda *args, **kwargs: build_callbacks(*args, **kwargs) + extra
    sys.exit(main.main(sys.argv[1:]))
