"""The per-step fixed cost: no host sync in a training step that is not a logging step, metrics logged
through utils.step_logging.StepMetrics exactly as Lightning's ``self.log`` would have written them."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from utils.step_logging import StepMetrics

# ----------------------------------------------------------------------------- StepMetrics vs self.log


class Regression(pl.LightningModule):
    """A linear regression whose steps log four scalars, through ``self.log`` or through StepMetrics."""

    def __init__(self, via_step_metrics: bool):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.via_step_metrics = via_step_metrics
        self.train_metrics = StepMetrics()

    def training_step(self, batch, batch_idx):
        x, y = batch
        err = self.layer(x).squeeze(1) - y
        loss = err.pow(2).mean()
        values = {"train/loss": (loss, dict(prog_bar=True)), "train/abs": (err.abs().mean(), {}),
                  "train/max": (err.abs().max(), dict(on_epoch=False)),
                  "train/per_dim": (loss / 3, dict(on_step=False))}
        for name, (value, flags) in values.items():
            flags = {"on_step": True, "on_epoch": True, **flags}
            if self.via_step_metrics:
                self.train_metrics.add(name, value, **flags)
            else:
                self.log(name, value, batch_size=x.shape[0], **flags)
        if self.via_step_metrics:
            self.train_metrics.commit(self, x.shape[0], batch_idx)
        return loss

    def on_train_epoch_end(self):
        if self.via_step_metrics:
            self.train_metrics.log_epoch(self)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression_rows(tmp_path: Path, via_step_metrics: bool, log_every: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(27, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(27, generator=g)
    # batches of 4 and a last one of 3: the epoch mean is weighted by batch size
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    save_dir = tmp_path / ("ours" if via_step_metrics else "lightning") / str(log_every)
    logger = pl.loggers.CSVLogger(save_dir, name="", version="")
    trainer = pl.Trainer(max_epochs=3, logger=logger, log_every_n_steps=log_every, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Regression(via_step_metrics), loader)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("log_every", [1, 3])
def test_step_metrics_write_what_self_log_writes(tmp_path, log_every):
    """Same columns, same rows, same values (as written, to the last digit) as Lightning's own ``self.log``
    with on_step/on_epoch/prog_bar and batch-size-weighted epoch means, over 3 epochs of 7 batches."""
    reference = regression_rows(tmp_path, False, log_every)
    ours = regression_rows(tmp_path, True, log_every)
    assert set(reference[0]) == {"epoch", "step", "train/loss_step", "train/loss_epoch", "train/abs_step",
                                 "train/abs_epoch", "train/max", "train/per_dim"}
    assert set(ours[0]) == set(reference[0])
    # row order within a step may differ (the epoch row is logged from on_train_epoch_end here)
    key = lambda row: tuple(sorted(row.items()))  # noqa: E731
    assert sorted(ours, key=key) == sorted(reference, key=key)
    step_rows = [r for r in ours if r["train/loss_step"]]
    assert len(step_rows) == 21 // log_every
    assert len([r for r in ours if r["train/loss_epoch"]]) == 3


def test_step_metrics_refuse_changing_flags_and_metric_sets():
    m = StepMetrics()
    m.add("a", torch.tensor(1.0))
    with pytest.raises(ValueError, match="'a' was added with"):
        m.add("a", torch.tensor(1.0), on_epoch=False)
    with pytest.raises(ValueError, match="never be logged"):
        m.add("b", torch.tensor(1.0), on_step=False, on_epoch=False)
    m.commit(_NoLog(), 2)  # no trainer: a logging step
    m.add("c", torch.tensor(2.0))
    with pytest.raises(ValueError, match="same every step"):
        m.commit(_NoLog(), 2)


class _NoLog(nn.Module):
    def log(self, *args, **kwargs):
        pass


# --------------------------------------------------------------------------- host syncs in a real run

SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
"""Tensor methods that make the host wait for the device (with a CUDA tensor)."""


def _sync_site(depth: int = 2) -> tuple[str, str]:
    """(kind, "file:line") of the caller ``depth`` frames up: kind "data" when the call is part of loading a
    batch (decoding and augmenting on host tensors: DataLoader workers in a GPU run), "optimizer step count"
    for PyTorch's optimizers reading their step counter (kept on the host by design unless fused or
    capturable: no device sync), else "step"."""
    frame = sys._getframe(depth)
    site = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
    if "/torch/optim/" in frame.f_code.co_filename and frame.f_code.co_name == "_get_value":
        return "optimizer step count", site
    f = frame
    while f is not None:
        if "/torch/utils/data/" in f.f_code.co_filename:
            return "data", site
        f = f.f_back
    return "step", site


class SyncCounter(pl.Callback):
    """Counts calls of :data:`SYNC_METHODS` (with the line that made them) from its ``on_train_batch_start``
    at step ``first`` to its ``on_train_batch_start`` at step ``last``: whole steps, every hook included.
    First in the callback list, so that every other callback's hooks of those steps fall inside. ``calls``:
    those that would wait for the device in a GPU run; ``host_side``: those on host-only tensors (batch
    loading, the optimizer's step counter)."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.active = False
        self.calls: list[str] = []
        self.host_side: list[str] = []
        self.steps: list[int] = []
        self._saved: dict = {}

    def on_train_start(self, trainer, pl_module):
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counting(tensor, *args, _original=original, _name=name, **kwargs):
                if self.active:
                    kind, site = _sync_site()
                    (self.calls if kind == "step" else self.host_side).append(f"{_name} at {site} ({kind})")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counting)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.active = self.first <= step < self.last
        if self.active:
            self.steps.append(step)

    def on_train_end(self, trainer, pl_module):
        self.active = False
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}

    on_exception = on_train_end


def count_syncs(tiny, tmp_path, name: str, first: int = 2, last: int = 14, **overrides) -> SyncCounter:
    """A real run (trainer.build: every callback of a run, CSV and wandb loggers) on the tiny set at batch 2
    (16 steps per epoch), syncs counted over steps ``first`` to ``last`` - 1."""
    import trainer as trainer_module
    from config.loading import parse_config

    flags = dict(data__batch_size=2, trainer__max_epochs=1, trainer__log_every_n_steps=50,
                 trainer__finite_check_every_n_steps=1000, trainer__checkpoint_every_n_steps=5,
                 callbacks__attention="false", callbacks__emergence="false", callbacks__cross_correlation="true")
    flags.update(overrides)
    cfg = parse_config(tiny(name, **flags))
    run = trainer_module.build(cfg)
    counter = SyncCounter(first, last)
    run.trainer.callbacks.insert(0, counter)
    try:
        trainer_module.fit(run)
    finally:
        counter.on_train_end(None, None)
    assert counter.steps == list(range(first, last))
    return counter


@pytest.mark.parametrize("variant", [
    pytest.param({}, id="adamw"),
    # the same run with LARS and with the dense term (its weight check: first batch only), kept out of CI
    pytest.param({"optim__name": "lars", "optim__lr_scaling": "linear"}, id="lars", marks=pytest.mark.slow),
    pytest.param({"barlow__dense_weight": 0.5, "barlow__dense_points": 4, "barlow__dense_proj_dim": 16},
                 id="dense", marks=pytest.mark.slow),
])
def test_training_steps_that_are_not_logging_steps_never_sync(tiny, tmp_path, variant):
    """12 whole steps of a real run (cross-correlation scalars, finite-loss guard, step checkpoints every 5
    steps in between — their checks are once per checkpoint, not per step — LR monitor, CSV + wandb
    loggers), none of them a logging step: not one ``.item()``/``.cpu()``/``bool(tensor)``/... call."""
    counter = count_syncs(tiny, tmp_path, "nosync", trainer__checkpoint_every_n_steps=0, **variant)
    assert counter.calls == []
    assert {c.split(" (")[1] for c in counter.host_side} <= {"data)", "optimizer step count)"}


def test_the_counter_sees_logging_steps_and_the_documented_periodic_checks(tiny, tmp_path):
    """The same window with a logging step every 4 steps (the loggers turn the values into numbers: syncs on
    those steps only), and the finite-loss guard every 5 steps (one ``.item()`` each)."""
    quick = dict(trainer__checkpoint_every_n_steps=0, trainer__limit_val_batches=0)  # no validation, no best checkpoint
    logging = count_syncs(tiny, tmp_path, "logging", trainer__log_every_n_steps=4, **quick)
    assert logging.calls, "logging steps convert the logged tensors: the counter must see it"
    guard = count_syncs(tiny, tmp_path, "guard", trainer__finite_check_every_n_steps=5, **quick)
    # on_train_batch_end at global steps 5 and 10 (steps 4 and 9 of the window, 0-based)
    assert [c.split(" at ")[0] for c in guard.calls] == ["item", "item"]
    assert all("finite_loss" in c for c in guard.calls)


def test_cross_correlation_scalars_only_on_logging_steps_epoch_means_over_every_step(tiny, tmp_path):
    """log_every_n_steps=3 against 1 (same seed, same losses): the step rows are every third step's, the
    epoch means are the same — over every step, not only the logged ones."""
    import main
    from tests.test_main import column, metrics

    runs = {}
    for every in (1, 3):
        args = tiny(f"every{every}", trainer__log_every_n_steps=every, callbacks__attention="false",
                    callbacks__emergence="false", trainer__limit_val_batches=0, log__wandb_mode="disabled")
        assert main.main(args) == 0
        runs[every] = metrics(tmp_path / "runs" / f"every{every}")
    all_steps, sparse = runs[1], runs[3]
    for name in ("train/loss_step", "train/on_diag_step", "cc/diag_mean"):
        dense_series = dict(column(all_steps, name))
        assert sorted(dense_series) == list(range(8)), name  # 2 epochs × 4 steps
        assert column(sparse, name) == [(s, dense_series[s]) for s in (2, 5)], name
    for name in ("train/loss_epoch", "train/on_diag_epoch", "train/off_diag_epoch", "train/loss_per_dim"):
        assert column(sparse, name) == column(all_steps, name), name
        assert len(column(sparse, name)) == 2
    # the epoch mean is the batch-weighted mean of the step values (equal batches: the plain mean)
    losses = [v for _, v in column(all_steps, "train/loss_step")]
    for epoch, (_, mean) in enumerate(column(all_steps, "train/loss_epoch")):
        assert mean == pytest.approx(sum(losses[4 * epoch:4 * epoch + 4]) / 4, rel=1e-6)
