"""Tasks: LightningModules holding the training logic, registered by name in ``TASKS``.

Every module of this package is imported here, so a task's file registers it (``TASKS.register(...)`` at
its end) without being listed anywhere: adding a method is its file (docs/extending.md)."""
import importlib
import pkgutil

from lightningmodules.base import TaskModule
from lightningmodules.registry import TASKS, Task

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["TASKS", "Task", "TaskModule"]
