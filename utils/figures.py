"""Matplotlib figures outside pyplot, and PNGs logged to wandb: shared by the picture callbacks and the tuner's
learning-rate plot."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytorch_lightning as pl


def subplots(rows: int, cols: int, **kwargs):
    """A matplotlib Figure and its axes grid, outside pyplot's global registry: figures can then be
    rendered by the background writer thread and need no plt.close()."""
    from matplotlib.figure import Figure

    squeeze = kwargs.pop("squeeze", True)
    figure = Figure(figsize=kwargs.pop("figsize", None), layout=kwargs.pop("layout", None))
    return figure, figure.subplots(rows, cols, squeeze=squeeze, **kwargs)


def log_image(trainer: pl.Trainer, key: str, path: Path, caption: str, step: Optional[int] = None) -> None:
    """Log the PNG at ``path`` to every wandb logger of ``trainer`` under ``key`` (at ``step``, default: now)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], caption=[caption],
                             step=trainer.global_step if step is None else step)
