"""DataModules and the dataset sources they read from (``DATASETS``: 'voc', 'synthetic')."""
from datamodules import voc as _voc  # noqa: F401  (registers the dataset sources)
from datamodules.registry import DATASETS

__all__ = ["DATASETS"]
