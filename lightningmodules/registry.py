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
    pretraining: bool = False
    """Self-supervised pretraining: its runs get the view pictures, the emergence Jaccard and the online probe
    (on the backbone its module's ``evaluated_role`` names), and its checkpoints initialise
    ``--backbone.weights`` of a downstream task."""
    views: int = 0
    """Augmented views of each image its objective compares (0: labelled images, no views); a two-view
    method's module implements ``embed(x1, x2)``."""
    diagnostic: Optional[str] = None
    """Its own "is it converging" picture, by callback name: 'cross_correlation' (the two views' embedding
    cross-correlation matrix, from the module's ``last_cross_correlation``) or 'teacher_entropy' (teacher
    entropy against the entropy of its mean output, from ``last_teacher_entropy``); None: none."""
    report: Optional[tuple[str, str]] = None
    """(metric, 'final' or 'best'): the value a reproduction table reports for a run of the task; None:
    (``monitor``, 'final')."""
    min_reliable_batch: int = 0
    """The smallest batch its objective is reliable at (batch statistics over the batch): the batch-size
    tuner warns below it; 0: no such bound."""
    min_reliable_batch_reason: str = ""
    """Why, for that warning: "<what> is estimated over the batch and <what goes wrong>" (the tuner adds
    "below N")."""

    def report_metric(self) -> tuple[str, str]:
        return self.report if self.report is not None else (self.monitor, "final")


TASKS: Registry[Task] = Registry("task")
