"""Matplotlib figures outside pyplot, and PNGs logged to wandb and TensorBoard: shared by the picture callbacks
and the tuner's learning-rate plot."""
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
    """Log the PNG at ``path`` to every wandb and TensorBoard logger of ``trainer`` under ``key`` (at ``step``,
    default: now). TensorBoard gets the pixels as written (RGB, alpha dropped) and no caption: its image tab
    shows the key and the step."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    step = trainer.global_step if step is None else step
    pixels = None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], caption=[caption], step=step)
        elif isinstance(logger, TensorBoardLogger):
            if pixels is None:
                import numpy as np
                from PIL import Image

                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
            logger.experiment.add_image(key, pixels, global_step=step, dataformats="HWC")
