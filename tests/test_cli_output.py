"""What a normal run prints: no known-irrelevant library notices, a model summary without a FLOPs column
of zeros, no eval-mode warning for a deliberately frozen backbone — and real warnings still shown."""
from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import nn

from callbacks.model_summary import RunModelSummary, frozen_modules, only_frozen_in_eval_mode
from utils.quiet import LIGHTNING_RANK_ZERO_LOGGER, DropMessages, silence_known_noise

ROOT = Path(__file__).resolve().parent.parent

# Each seen on every run before (pytorch-lightning 2.6.6, wandb 0.31, torch 2.14).
NOISE = (
    "litlogger",
    "was configured so 100% of the batches",
    "The anonymous setting has no effect",
    "isinstance(treespec, LeafSpec)",
    "FLOPs",
    "Total Flops",
    "module(s) in eval mode",
    "Loading `train_dataloader` to estimate number of stepping batches",
    "Trainer already configured with model summary callbacks",
)


def run_main(flags: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_barlow_twins_run_prints_no_known_noise(tiny):
    out = run_main(tiny("bt", trainer__max_epochs=1))
    assert out.returncode == 0, out.stderr[-3000:]
    for noise in NOISE:
        assert noise not in out.stderr, noise
    assert "Trainable params" in out.stderr and "Modules in train mode" in out.stderr  # the summary is still there
    assert "Modules in eval mode" not in out.stderr and "frozen" not in out.stderr


def test_a_segmentation_run_reports_the_frozen_backbone_as_frozen(tiny):
    out = run_main(tiny("seg", task="segmentation", trainer__max_epochs=1, segmentation__hidden_dim=16))
    assert out.returncode == 0, out.stderr[-3000:]
    for noise in NOISE:
        assert noise not in out.stderr, noise
    assert "Modules frozen (eval mode, no gradients)" in out.stderr


# ---------------------------------------------------------------- the filters themselves
def test_known_warning_is_filtered_and_others_still_show():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_known_noise()
        lightning_pytree = "pytorch_lightning.utilities._pytree"
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                               "_pytree.py", 21, module=lightning_pytree)
        warnings.warn_explicit("something else is deprecated", FutureWarning, "_pytree.py", 30, module=lightning_pytree)
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                               "ours.py", 1, module="models.ours")  # the same text from our code: shown
        warnings.warn("a real problem", UserWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated",
                                              "`isinstance(treespec, LeafSpec)` is deprecated, use ...",
                                              "a real problem"]


def test_known_log_lines_are_dropped_and_others_kept(caplog):
    logger = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    before = list(logger.filters)
    try:
        silence_known_noise()
        silence_known_noise()  # idempotent
        assert sum(isinstance(f, DropMessages) for f in logger.filters) == 1
        with caplog.at_level(logging.INFO, logger=LIGHTNING_RANK_ZERO_LOGGER):
            logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
            logger.info("GPU available: False, used: False")
            logger.warning("a real warning")
        assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False", "a real warning"]
    finally:
        logger.filters[:] = before


# ---------------------------------------------------------------- the model summary
class Net(pl.LightningModule):
    def __init__(self, freeze: bool = True, trainable_in_eval: bool = False, stray_eval: bool = False):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 4))
        self.head = nn.Sequential(nn.Linear(4, 2), nn.Dropout())
        if freeze:
            self.backbone.requires_grad_(False).eval()
        if trainable_in_eval:
            self.head.eval()
        if stray_eval:
            self.head[1].eval()


def test_frozen_means_eval_mode_and_no_trainable_parameter():
    assert frozen_modules(Net()) == {"backbone", "backbone.0", "backbone.1", "backbone.2"}
    assert only_frozen_in_eval_mode(Net())
    assert not only_frozen_in_eval_mode(Net(freeze=False))  # nothing in eval mode
    assert not only_frozen_in_eval_mode(Net(trainable_in_eval=True))  # a trainable head left in eval mode
    assert not only_frozen_in_eval_mode(Net(stray_eval=True))  # a parameter-free module outside the frozen part


def _fit_start_warnings(module: pl.LightningModule) -> list[str]:
    """The eval-mode warning as Lightning's fit loop emits it, between on_fit_start and on_train_start."""
    summary = RunModelSummary()
    summary.summarize = lambda *args, **kwargs: None  # the table is tested below
    count = sum(1 for _, m in module.named_modules() if not m.training)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        summary.on_fit_start(_FakeTrainer(), module)
        warnings.warn(f"Found {count} module(s) in eval mode at the start of training. This may ...",
                      PossibleUserWarning)
        summary.on_train_start(_FakeTrainer(), module)
        warnings.warn(f"Found {count} module(s) in eval mode at the start of training. This may ...",
                      PossibleUserWarning)
    return [str(w.message)[:6] for w in seen]


class _FakeTrainer:
    is_global_zero = True
    strategy = None


def test_eval_mode_warning_is_silenced_only_for_a_frozen_part_and_only_until_training_starts(monkeypatch):
    monkeypatch.setattr(RunModelSummary, "_summary", lambda self, trainer, module: _StubSummary())
    assert _fit_start_warnings(Net()) == ["Found "]  # silenced at fit start, shown again afterwards
    assert _fit_start_warnings(Net(trainable_in_eval=True)) == ["Found ", "Found "]  # not deliberate: shown


class _StubSummary:
    total_parameters = trainable_parameters = 0
    model_size = 0.0
    total_training_modes = {"train": 1, "eval": 0}
    total_flops = 0

    def _get_summary_data(self):
        return [(" ", ["0"]), ("Name", ["a"]), ("Type", ["Linear"]), ("Params", ["20"]), ("Mode", ["train"]),
                ("FLOPs", ["0"])]


def _table(caplog, summary: RunModelSummary, flops: int, modes: dict) -> str:
    data = [(" ", ["0", "1"]), ("Name", ["backbone", "head"]), ("Type", ["Sequential", "Sequential"]),
            ("Params", ["40", "10"]), ("Mode", ["eval", "train"]), ("FLOPs", [str(flops), str(flops)])]
    with caplog.at_level(logging.INFO, logger="callbacks.model_summary"):
        summary.summarize(data, 50, 10, 0.0002, modes, flops)
    return caplog.records[-1].getMessage()


def test_summary_has_flops_only_when_measured_and_names_frozen_modules(caplog):
    summary = RunModelSummary()
    summary._frozen_only = True
    text = _table(caplog, summary, 0, {"train": 3, "eval": 4})
    assert "FLOPs" not in text and "Flops" not in text
    assert text.splitlines()[1].rstrip().endswith("Mode")
    assert "4         Modules frozen (eval mode, no gradients)" in text and "Modules in eval mode" not in text
    assert "10        Trainable params" in text and "40        Non-trainable params" in text

    summary._frozen_only = False
    text = _table(caplog, summary, 1200, {"train": 3, "eval": 4})
    assert text.splitlines()[1].rstrip().endswith("FLOPs") and "1.2 K     Total FLOPs" in text
    assert "4         Modules in eval mode" in text  # not deliberately frozen: reported as Lightning does
