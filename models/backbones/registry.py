"""The backbone registry: ``name -> factory(cfg: BackboneConfig, img_size: int) -> nn.Module``."""
from utils.registry import Registry

BACKBONES: Registry = Registry("backbone")
