"""The task registry: ``--task NAME`` → LightningModule + DataModule + the metric that picks the best checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytorch_lightning as pl

from config.hparams import Hparams
from utils.registry import Registry


@dataclass(frozen=True)
class Task:
    module: type[pl.LightningModule]
    """Constructed as ``module(config_dict)``."""
    datamodule: Callable[[Hparams], pl.LightningDataModule]
    monitor: str
    """Validation metric that selects checkpoints/best-*.ckpt."""
    mode: str
    """'min' or 'max' for ``monitor``."""
    metrics: tuple[str, ...] = ()
    """Every metric name the task logs (metrics.csv columns and wandb keys), for checking sweep metrics."""
    check_config: Optional[Callable[[Hparams], Optional[str]]] = None
    """The task's own check of a config that chose it (e.g. which backbones it trains), run by
    config.validation before any data or model is touched: a one-line problem naming the flag, or None."""


TASKS: Registry[Task] = Registry("task")
