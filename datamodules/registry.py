"""Dataset registry: ``name -> DatasetSource`` (where the VOC-layout folder comes from)."""
from utils.registry import Registry

DATASETS: Registry = Registry("dataset")
