"""The task registry: ``--task NAME`` → LightningModule + DataModule + the metric that picks the best checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


TASKS: Registry[Task] = Registry("task")
