"""Tasks: LightningModules holding the training logic, registered by name in ``TASKS``."""
from lightningmodules import barlow_twins as _barlow_twins  # noqa: F401  (registers 'barlow_twins')
from lightningmodules.registry import TASKS, Task

__all__ = ["TASKS", "Task"]
