"""What the console gets when it is not a terminal (a file, a pipe, a batch job's log).

A terminal gets everything. Elsewhere, unless ``--log.verbose true``: no progress bars (their carriage returns
and escape sequences fill a file with thousands of redrawn lines), none of the libraries' notices listed
below, and no wandb banner or 25-line history and summary: the run's own lines and a short summary at the end
(main.py). Each silenced notice is named here with why it is harmless; every other warning still shows.
Importing this module imports nothing heavy.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

from config.hparams import Hparams
from utils.quiet import DropMessages

# warnings.filterwarnings message patterns (pytorch-lightning 2.6 warnings).
QUIET_WARNINGS = (
    # Every run whose epoch has fewer steps than --trainer.log_every_n_steps (the quick start's 8 < 50):
    # the per-step rows are written every log_every_n_steps global steps across epochs and every epoch
    # mean is still logged, so nothing is lost.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # ModelCheckpoint on every resume: the directory is the run's own checkpoints/ folder, which it continues.
    r"Checkpoint directory .* exists and is not empty",
)

# logger name -> message prefixes (INFO lines).
QUIET_INFO = {
    # On a checkpoint save that does not say weights_only (Lightning 2.6 logs it each time): the checkpoint then
    # holds everything (optimizer, loops, callbacks), which is what resuming needs.
    "pytorch_lightning.trainer.connectors.checkpoint_connector": ("`weights_only` was not set",),
}


def console_is_terminal() -> bool:
    """Whether both stdout (progress bars, the summary) and stderr (logs, warnings) go to a terminal."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def quiet_console(cfg: Hparams) -> bool:
    """Install the quiet defaults unless ``--log.verbose`` is on or the console is a terminal; whether it did.
    Call before wandb and Lightning start (wandb reads ``WANDB_SILENT`` when a run starts)."""
    if cfg.log.verbose or console_is_terminal():
        return False
    os.environ["WANDB_SILENT"] = "true"  # main.py prints the one line that matters: where the offline run is
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefixes in QUIET_INFO.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))
    return True


def show_progress_bar(cfg: Hparams) -> bool:
    """``--trainer.progress_bar``, on a terminal (or with ``--log.verbose``) only."""
    return cfg.trainer.progress_bar and (cfg.log.verbose or console_is_terminal())
