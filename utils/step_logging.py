"""Training-step metrics at a small fixed cost: Lightning's ``self.log`` only on the steps whose values
reach a logger or the progress bar, epoch means accumulated on the device every step.

Each ``LightningModule.log`` call costs about 0.3–0.5 ms of Python on the host (pytorch-lightning 2.6:
metadata objects, ``apply_to_collection`` over the stored metric), whatever the device: five scalars per
step were about 2 ms per step, more than the whole step of a small model. Lightning writes on-step values
only every ``trainer.log_every_n_steps`` steps, so logging them on the other steps is work thrown away;
the epoch means, which do need every step, are summed here with three tensor operations per step for all
metrics together (no host sync).

Used by the training steps of ``lightningmodules/barlow_twins.py`` (and usable by any other task): replace
``self.log(name, value, on_step=..., on_epoch=..., prog_bar=..., batch_size=b)`` in ``training_step`` with
``self.train_metrics.add(name, value, on_step=..., on_epoch=..., prog_bar=...)``, call
``self.train_metrics.commit(self, batch_size)`` once at the end of the step and
``self.train_metrics.log_epoch(self)`` in ``on_train_epoch_end``. The loggers receive the same columns with
the same values as with ``self.log``: ``name_step`` and ``name_epoch`` for a metric logged on step and
epoch, ``name`` for one logged on only one of them; epoch values are batch-size-weighted means computed
exactly as Lightning does (float32 sums of value × batch size, divided by the summed batch sizes).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def is_logging_step(trainer) -> bool:
    """Whether Lightning writes the on-step metrics of the current training batch to the loggers: every
    ``log_every_n_steps`` optimizer steps, when the run is stopping, and in ``fast_dev_run``. Valid from
    ``on_train_batch_start`` to ``on_train_batch_end`` (Lightning's own ``LearningRateMonitor`` asks the
    same question). Without a trainer (a module called directly): True."""
    if trainer is None:
        return True
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        return True
    return bool(connector.should_update_logs or trainer.fast_dev_run)


def refreshes_progress_bar(trainer, batch_idx: int) -> bool:
    """Whether the progress bar redraws its metrics after training batch ``batch_idx`` (TQDM/Rich: every
    ``refresh_rate`` batches and at the last batch of the epoch)."""
    if trainer is None:
        return False
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not getattr(bar, "is_enabled", False):
        return False
    rate = int(getattr(bar, "refresh_rate", 1) or 0)
    if rate <= 0:
        return False
    n = batch_idx + 1
    return n % rate == 0 or n == trainer.num_training_batches


class StepMetrics:
    """One training step's scalars, logged at the cost of three device operations per step, plus Lightning
    ``log`` calls on logging steps only (see the module docstring)."""

    def __init__(self) -> None:
        self._kinds: dict[str, tuple[bool, bool, bool]] = {}  # name → (on_step, on_epoch, prog_bar)
        self._values: dict[str, Tensor] = {}
        self._epoch_names: Optional[tuple[str, ...]] = None
        self._sum: Optional[Tensor] = None  # float32, one entry per epoch metric: Σ value × batch size
        self._count = 0  # Σ batch size

    def add(self, name: str, value: Tensor, *, on_step: bool = True, on_epoch: bool = True,
            prog_bar: bool = False) -> None:
        """Queue one scalar of this step (detached); the flags mean what they mean for ``LightningModule.log``
        and must stay the same for a name."""
        if not (on_step or on_epoch):
            raise ValueError(f"metric {name!r}: on_step and on_epoch are both False, it would never be logged")
        kind = (on_step, on_epoch, prog_bar)
        if self._kinds.setdefault(name, kind) != kind:
            raise ValueError(f"metric {name!r} was added with on_step, on_epoch, prog_bar = {self._kinds[name]} "
                             f"before and {kind} now")
        self._values[name] = value.detach()

    def step_name(self, name: str) -> str:
        on_step, on_epoch, _ = self._kinds[name]
        return f"{name}_step" if on_step and on_epoch else name

    def epoch_name(self, name: str) -> str:
        on_step, on_epoch, _ = self._kinds[name]
        return f"{name}_epoch" if on_step and on_epoch else name

    def commit(self, module, batch_size: int, batch_idx: int = -1) -> None:
        """End of the training step: add the queued epoch metrics × ``batch_size`` to the device-side sums,
        and hand the on-step ones to Lightning if this step's values are written (logging step) or shown
        (progress-bar refresh: its metrics only)."""
        values, self._values = self._values, {}
        epoch = tuple(n for n in values if self._kinds[n][1])
        if epoch:
            if self._epoch_names is None:
                self._epoch_names = epoch
            elif epoch != self._epoch_names:
                raise ValueError(f"the epoch metrics of a training step must be the same every step: "
                                 f"{list(self._epoch_names)} before, {list(epoch)} now")
            stacked = torch.stack([values[n] if values[n].dtype == torch.float32 else values[n].float()
                                   for n in epoch])
            weighted = stacked * batch_size
            # Lightning's _ResultMetric.update: value = value + x * batch_size, from a float32 zero
            self._sum = weighted if self._sum is None else self._sum + weighted
            self._count += batch_size
        trainer = getattr(module, "_trainer", None)
        logging_step = is_logging_step(trainer)
        bar = not logging_step and refreshes_progress_bar(trainer, batch_idx)
        if not (logging_step or bar):
            return
        for name, value in values.items():
            on_step, _, prog_bar = self._kinds[name]
            if on_step and (logging_step or prog_bar):
                module.log(self.step_name(name), value, on_step=True, on_epoch=False, prog_bar=prog_bar,
                           batch_size=batch_size)

    def log_epoch(self, module) -> None:
        """Log the epoch means (call from the module's ``on_train_epoch_end``) and start a new epoch."""
        if self._sum is not None and self._count:
            means = self._sum / torch.tensor(self._count)
            for i, name in enumerate(self._epoch_names):
                module.log(self.epoch_name(name), means[i], on_step=False, on_epoch=True,
                           prog_bar=self._kinds[name][2], batch_size=1)
        self.reset()

    def reset(self) -> None:
        """Forget the sums (a new epoch)."""
        self._sum, self._count, self._values = None, 0, {}

    def state_dict(self) -> dict:
        """The epoch so far (sums, summed batch sizes, the metrics' flags), for a checkpoint: a run resumed in
        the middle of an epoch continues the sums, so its epoch means are the uninterrupted run's, bit for bit."""
        return {"kinds": {name: list(kind) for name, kind in self._kinds.items()},
                "epoch_names": None if self._epoch_names is None else list(self._epoch_names),
                "sum": None if self._sum is None else self._sum.detach().cpu().clone(),
                "count": self._count}

    def load_state_dict(self, state: dict, device=None) -> None:
        """Continue the epoch of :meth:`state_dict` (sums moved to ``device``)."""
        self._kinds = {name: tuple(kind) for name, kind in state["kinds"].items()}
        self._epoch_names = None if state["epoch_names"] is None else tuple(state["epoch_names"])
        self._sum = None if state["sum"] is None else state["sum"].to(device)
        self._count, self._values = int(state["count"]), {}


EPOCH_STATE_KEY = "epoch_accumulators"  # the checkpoint entry holding the training epoch's running sums


def metric_state(metric) -> dict:
    """A torchmetrics ``Metric``'s accumulated state (its tensors on the CPU and its update count)."""
    return {"states": {name: getattr(metric, name).detach().cpu().clone() for name in metric._defaults},
            "update_count": int(metric._update_count)}


def load_metric_state(metric, state: dict) -> None:
    """Put :func:`metric_state`'s values back into ``metric`` (on the metric's device), as if its updates ran."""
    device = metric.device
    for name, value in state["states"].items():
        setattr(metric, name, value.to(device))
    metric._update_count = state["update_count"]
    metric._computed = None


class StepMetricsHooks:
    """The LightningModule hooks of a module that logs its training scalars through ``self.train_metrics`` (a
    :class:`StepMetrics`): list it before ``pl.LightningModule`` among the bases. A module with more to do at
    an epoch's end overrides the hook and calls ``super()``.

    Checkpoints carry the training epoch's running sums (``train_metrics`` and the torchmetrics metrics named
    in ``epoch_metric_attributes``, e.g. a training confusion matrix): a run resumed from a checkpoint taken in
    the middle of an epoch logs the same epoch values as the uninterrupted run, not means over the batches
    after the resume. A module that defines its own ``on_load_checkpoint`` calls ``super()``."""

    train_metrics: StepMetrics
    epoch_metric_attributes: tuple[str, ...] = ()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[EPOCH_STATE_KEY] = {
            "train_metrics": self.train_metrics.state_dict(),
            **{name: metric_state(getattr(self, name)) for name in self.epoch_metric_attributes},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Applied in on_train_start (Lightning restores the module before that hook, which starts from zero).
        self._pending_epoch_state = checkpoint.get(EPOCH_STATE_KEY)

    def on_train_start(self) -> None:
        pending, self._pending_epoch_state = getattr(self, "_pending_epoch_state", None), None
        # Only when fit() resumes a checkpoint: the tuner's temporary checkpoints are loaded too, and its trial
        # steps' sums must go (a checkpoint of an earlier version has no entry: the epoch starts from zero).
        if pending is not None and self.trainer.ckpt_path is not None:
            self.train_metrics.load_state_dict(pending["train_metrics"], self.device)
            for name in self.epoch_metric_attributes:
                if name in pending:
                    load_metric_state(getattr(self, name), pending[name])
        else:
            self.train_metrics.reset()
            for name in self.epoch_metric_attributes:
                getattr(self, name).reset()

    def on_train_epoch_end(self) -> None:
        self.train_metrics.log_epoch(self)
