"""Tasks: LightningModules holding the training logic, registered by name in ``TASKS``."""
from lightningmodules import barlow_twins as _barlow_twins  # noqa: F401  (registers 'barlow_twins')
from lightningmodules import dino as _dino  # noqa: F401  (registers 'dino')
from lightningmodules import segmentation as _segmentation  # noqa: F401  (registers 'segmentation')
from lightningmodules.registry import TASKS, Task

__all__ = ["TASKS", "Task"]
