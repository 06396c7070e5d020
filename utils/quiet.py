"""Known, irrelevant messages of the libraries vitssl runs on, filtered by their exact text.

Everything that can be silenced at its source is (trainer.py passes Lightning the arguments that do not
trigger its notices, utils/loggers.py does not pass wandb a deprecated setting, callbacks/model_summary.py
prints the summary without a FLOPs column of zeros). What is left here cannot be turned off by an argument;
each entry names the library and the message, and every other warning and log line still shows.
Importing this module imports nothing heavy: it must not slow down reporting a config error.
"""
from __future__ import annotations

import logging
import warnings

# Logged at INFO by pytorch-lightning 2.6 on every run, whatever the Trainer arguments.
LIGHTNING_RANK_ZERO_LOGGER = "pytorch_lightning.utilities.rank_zero"
LIGHTNING_INFO_NOISE = (
    # An advertisement for Lightning's hosted logger, printed whenever no LitLogger is used.
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    # Internal step of trainer.estimated_stepping_batches (our LR schedule's length).
    "Loading `train_dataloader` to estimate number of stepping batches.",
)

# (message regex, category, module regex) for warnings.filterwarnings.
WARNING_NOISE = (
    # pytorch-lightning 2.6.6's own pytree helper uses torch's deprecated LeafSpec; nothing of ours involved.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"pytorch_lightning\.utilities\._pytree"),
)


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def silence_known_noise() -> None:
    """Install the filters above (idempotent)."""
    logger = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    if not any(isinstance(f, DropMessages) for f in logger.filters):
        logger.addFilter(DropMessages(LIGHTNING_INFO_NOISE))
    for message, category, module in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
