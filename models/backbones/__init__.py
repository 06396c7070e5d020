"""Backbones: a registry of named factories, plus every timm ViT name.

``build_backbone(cfg, img_size)`` returns an ``nn.Module`` mapping images (B, 3, H, W) to embeddings
(B, num_features), with attributes ``num_features`` and ``batch_coupled`` (True when it has BatchNorm,
so the two Barlow Twins views must not share a forward pass).
"""
from __future__ import annotations

from torch import nn

from config.hparams import BackboneConfig
from models.backbones import pixels as _pixels  # noqa: F401  (registers 'pixels')
from models.backbones import resnet as _resnet  # noqa: F401  (registers 'resnet50')
from models.backbones import vit as _vit  # noqa: F401  (registers 'vit')
from models.backbones.registry import BACKBONES
from models.backbones.vit import build_vit, timm_vit_names
from utils.registry import UnknownNameError


def is_vit(name: str) -> bool:
    """A timm VisionTransformer (ViT heads and attention callbacks apply); 'pixels' is one in shape."""
    return name in ("vit", "pixels") or name in timm_vit_names()


def check_backbone_name(name: str) -> None:
    if name not in BACKBONES and name not in timm_vit_names():
        raise UnknownNameError(
            "backbone", name, BACKBONES.names(),
            hint="or any timm ViT name, e.g. vit_small_patch16_224, vit_small_patch8_224.dino; "
            "python -c \"import timm; print(timm.list_models('vit_*', pretrained=True))\" lists them",
        )


def build_backbone(cfg: BackboneConfig, img_size: int) -> nn.Module:
    check_backbone_name(cfg.name)
    if cfg.name in BACKBONES:
        return BACKBONES.get(cfg.name)(cfg, img_size)
    return build_vit(cfg, img_size)
