"""DINO's collapse monitor: the teacher's entropy against the entropy of its mean output, over training.

DINO (Caron et al., 2021, sec. 5.3 "Avoiding collapse", fig. 7) names two ways its self-distillation
collapses, and shows that centering and sharpening each prevent one of them and cause the other:

* *one dimension dominates* (sharpening without centering): every image's teacher distribution P_t is the
  same one-hot vector, so its entropy h(P_t) goes to 0;
* *uniform output* (centering without sharpening): every P_t is uniform over the K = ``dino.out_dim``
  dimensions, so h(P_t) goes to log K.

Either way the output no longer depends on the image; the paper shows it as the KL between teacher and
student going to 0 next to h(P_t) going to 0 or log K. This picture shows the same two outcomes from the
teacher alone, from the two numbers the DINO module keeps each step (the centred, sharpened teacher softmax
of the global crops; :mod:`lightningmodules.dino`):

* ``train/teacher_entropy`` = mean over the batch's images of H(P_t(x)): how sharp each image's output is;
* ``train/teacher_mean_entropy`` = H(mean over the batch of P_t(x)): how spread the batch's outputs are
  over the K dimensions together.

How to read it (``media/teacher_entropy_e<epoch>.png``, wandb ``media/teacher_entropy``; both curves in
nats, on one axis from 0 to log K, which is drawn):

* **healthy**: the teacher entropy low (sharp outputs), the entropy of the mean high (different images use
  different dimensions); a wide gap between the curves;
* **collapse to one dimension**: both curves near 0;
* **collapse to uniform**: both curves near log K;
* in either collapse the curves meet. The gap, drawn in the lower panel, is
  H(mean P_t) − mean H(P_t) = the mutual information between a teacher output of the batch and its output
  dimension: 0 exactly when every image gets the same distribution (the paper's KL → 0), never above
  log N for the N outputs averaged (the module averages both global crops of every image of the global
  batch, all devices together), so small batches cap it.

The values are the module's detached device tensors, recorded after every training step into a tensor on
the same device — no host synchronisation during training; they are copied to the host only when the
picture is drawn (every ``--callbacks.every_n_epochs`` epochs and after the last) and when a checkpoint is
written (the history is saved with it, so a resumed run's picture continues where it stopped). Rank zero
records and draws (the module's values are already over the global batch). Steps of the batch-size and LR
search are not recorded (they are thrown away).
"""
from __future__ import annotations

import math
from typing import Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from callbacks.emergence import tuning
from callbacks.visual import save_figure, wait_for_pictures
from lightningmodules.base import TaskModule
from utils.figures import subplots

ENTROPY_ATTR = "last_teacher_entropy"
MEAN_ENTROPY_ATTR = "last_teacher_mean_entropy"
MAX_POINTS = 2000
"""Most points drawn per curve: longer histories are shown as means of consecutive steps."""
INITIAL_CAPACITY = 1024  # steps; the device buffer doubles when full


def output_dim(pl_module: pl.LightningModule) -> Optional[int]:
    """K, the number of dimensions the teacher's softmax is over: a task module's declared ``output_dim``
    (lightningmodules/base.py); for another module, the width of its ``center`` buffer; None when unknown."""
    if isinstance(pl_module, TaskModule):
        return pl_module.output_dim
    center = getattr(pl_module, "center", None)
    return int(center.shape[-1]) if isinstance(center, Tensor) and center.ndim >= 1 else None


def block_means(steps: list[int], values: Tensor, max_points: int = MAX_POINTS) -> tuple[list[float], Tensor, int]:
    """(x, y, f): ``values`` (N, C) as means of f consecutive rows, f = ceil(N / max_points) (the last block
    averages the rows it has), x the mean step of each block; f = 1 leaves them as they are."""
    n = values.shape[0]
    f = max(1, math.ceil(n / max_points))
    if f == 1:
        return [float(s) for s in steps], values, 1
    xs, ys = [], []
    for start in range(0, n, f):
        xs.append(sum(steps[start:start + f]) / len(steps[start:start + f]))
        ys.append(values[start:start + f].mean(dim=0))
    return xs, torch.stack(ys), f


def plot_teacher_entropy(steps: list[int], values: Tensor, out_dim: Optional[int], title: str):
    """The figure: upper panel, the teacher entropy and the entropy of the teacher's mean output (column 0
    and 1 of ``values``, nats) against the training step, with 0 (one dimension) and log K (uniform) marked;
    lower panel, their gap (mean-output entropy minus teacher entropy)."""
    values = values.detach().float().cpu()
    xs, ys, f = block_means(steps, values)
    figure, (top, bottom) = subplots(2, 1, figsize=(8.0, 6.4), sharex=True,
                                     gridspec_kw={"height_ratios": [2.2, 1.0]}, layout="constrained")
    averaged = f" (means of {f} steps)" if f > 1 else ""
    top.plot(xs, ys[:, 1].numpy(), color="tab:blue", linewidth=1.2,
             label=f"entropy of the batch-mean teacher output H(mean P_t){averaged}")
    top.plot(xs, ys[:, 0].numpy(), color="tab:red", linewidth=1.2,
             label=f"teacher entropy: mean over images of H(P_t){averaged}")
    top.axhline(0.0, color="black", linestyle=":", linewidth=1.0)
    top.text(0.005, 0.0, " 0: one dimension (collapse)", transform=top.get_yaxis_transform(), va="bottom",
             fontsize=8)
    if out_dim:
        uniform = math.log(out_dim)
        top.axhline(uniform, color="black", linestyle="--", linewidth=1.0)
        top.text(0.005, uniform, f" log K = log {out_dim} = {uniform:.2f}: uniform (collapse)",
                 transform=top.get_yaxis_transform(), va="top", fontsize=8)
        top.set_ylim(-0.04 * uniform, 1.04 * uniform)
    top.set_ylabel("entropy (nats)")
    top.legend(loc="center right", fontsize=8)
    top.grid(alpha=0.3)
    gap = (ys[:, 1] - ys[:, 0]).numpy()
    bottom.plot(xs, gap, color="tab:purple", linewidth=1.2)
    bottom.axhline(0.0, color="black", linestyle=":", linewidth=1.0)
    bottom.set_ylabel("gap (nats)")
    bottom.set_xlabel("training step")
    bottom.set_title("H(mean P_t) − mean H(P_t): how much the output depends on the image (0: it does not)",
                     fontsize=9)
    bottom.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    return figure


class TeacherEntropyCallback(pl.Callback):
    """See the module docstring. Does nothing for a module without ``last_teacher_entropy``."""

    name = "teacher_entropy"

    def __init__(self, every_n_epochs: int = 5):
        self.every_n_epochs = max(1, every_n_epochs)
        self._values: Optional[Tensor] = None  # (capacity, 2) on the module's device: entropy, mean entropy
        self._count = 0
        self.steps: list[int] = []  # global step of each recorded row (host ints: no sync to keep them)
        self._batch_step = 0

    # -- recording -----------------------------------------------------------------------------------
    def recording(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and not trainer.sanity_checking and not tuning(trainer)

    def record(self, step: int, entropy: Tensor, mean_entropy: Tensor) -> None:
        """Append one step's values to the device buffer (device ops only: no host synchronisation)."""
        row = torch.stack([entropy.detach().reshape(()), mean_entropy.detach().reshape(())]).float()
        if self._values is None:
            self._values = torch.empty(INITIAL_CAPACITY, 2, device=row.device)
        elif self._values.device != row.device:
            self._values = self._values.to(row.device)
        if self._count == self._values.shape[0]:
            grown = torch.empty(2 * self._count, 2, device=row.device)
            grown[:self._count] = self._values
            self._values = grown
        self._values[self._count] = row
        self._count += 1
        self.steps.append(int(step))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The step the batch is trained at, as Lightning logs its train/* values (metrics.csv's step column);
        # by on_train_batch_end the optimiser step has moved global_step on.
        self._batch_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The interface of lightningmodules/base.py (None until the module's first step); a module outside it
        # (not a TaskModule, e.g. a plain LightningModule) has no entropies and records nothing.
        entropy = getattr(pl_module, ENTROPY_ATTR, None)
        mean_entropy = getattr(pl_module, MEAN_ENTROPY_ATTR, None)
        if entropy is None or mean_entropy is None or not self.recording(trainer):
            return
        self.record(self._batch_step, entropy, mean_entropy)

    def history(self) -> tuple[list[int], Tensor]:
        """(steps, (N, 2) float32 CPU tensor of teacher entropy and mean-output entropy): one host copy."""
        if self._values is None:
            return [], torch.empty(0, 2)
        return list(self.steps), self._values[:self._count].cpu()

    # -- drawing -------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        if not self.recording(trainer) or not (epoch % self.every_n_epochs == 0 or last) or not self._count:
            return
        steps, values = self.history()
        k = output_dim(pl_module)
        now = values[-1]
        title = (f"DINO teacher entropy vs entropy of its mean output, epoch {epoch}, step {trainer.global_step}"
                 f"\nlatest: {float(now[0]):.3g} and {float(now[1]):.3g} nats"
                 + (f" of log K = {math.log(k):.3g}" if k else "")
                 + " · both near 0 or both near log K: collapse")
        save_figure(trainer, plot_teacher_entropy(steps, values, k, title), f"{self.name}_e{epoch:03d}")

    def on_train_end(self, trainer, pl_module) -> None:
        wait_for_pictures()

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The history so far (a host copy, taken when a checkpoint is written): plain tensors and ints,
        loadable with ``torch.load(weights_only=True)``."""
        if not self._count:
            return {}
        steps, values = self.history()
        return {"steps": torch.tensor(steps, dtype=torch.long), "values": values}

    def load_state_dict(self, state_dict: dict) -> None:
        self._values, self._count, self.steps = None, 0, []
        if not state_dict:
            return
        values = state_dict["values"].float()
        self.steps = [int(s) for s in state_dict["steps"].tolist()]
        self._count = values.shape[0]
        self._values = torch.empty(max(INITIAL_CAPACITY, 2 * self._count), 2)
        self._values[:self._count] = values  # moved to the module's device at the next record()
