"""DataModules and the dataset sources they read from (``DATASETS``: 'voc', 'synthetic', 'folder', 'imagenet')."""
from datamodules import synthetic_voc as _synthetic_voc  # noqa: F401  (registers 'synthetic')
from datamodules import voc as _voc  # noqa: F401  (registers 'voc')
from datamodules import folder as _folder  # noqa: F401  (registers 'folder' and 'imagenet')
from datamodules.registry import DATASETS

__all__ = ["DATASETS"]
