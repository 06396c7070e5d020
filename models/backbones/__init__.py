"""Backbones: a registry of named factories, plus every timm ViT name.

``build_backbone(cfg, img_size)`` returns an ``nn.Module`` mapping images (B, 3, H, W) to embeddings
(B, num_features), with attributes ``num_features`` and ``batch_coupled`` (True when it has BatchNorm,
so the two Barlow Twins views must not share a forward pass).

What a registry line may say about its backbone (``@BACKBONES.register("name", ...)``, each keyword optional):
``architecture=f`` (``f(cfg.backbone) -> {depth, embed_dim, num_heads, patch_size}`` of a ViT-shaped backbone
that is not a timm model, e.g. 'pixels'), ``check_config=f`` (``f(cfg: Hparams) -> Optional[str]``, its own
check of a config that chose it: a one-line problem naming the flag, or None; see :func:`check_backbone_config`),
``kind="vit"|"cnn"`` (a timm-VisionTransformer-shaped token model: ViT heads apply; or a convolutional trunk
with ``layer1..layer4``; an entry without it is neither) and ``attention=bool`` (whether its blocks compute
attention that the attention maps and the emergence Jaccard can read; default False). Every timm ViT name is a
ViT with attention.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from config.hparams import BackboneConfig, Hparams
from models.backbones import pixels as _pixels  # noqa: F401  (registers 'pixels')
from models.backbones import resnet as _resnet  # noqa: F401  (registers 'resnet50')
from models.backbones import vit as _vit  # noqa: F401  (registers 'vit')
from models.backbones.registry import BACKBONES
from models.backbones.vit import build_vit, timm_vit_names, vit_architecture
from utils.registry import UnknownNameError


def backbone_kind(name: str) -> str:
    """'vit' (a timm VisionTransformer in shape: ViT heads apply), 'cnn', or 'other', as its registry entry says
    (every timm ViT name: 'vit')."""
    return getattr(BACKBONES.get(name), "kind", "other") if name in BACKBONES else "vit"


def has_attention(name: str) -> bool:
    """Whether the backbone's blocks compute attention (attention maps, emergence Jaccard), as its entry says."""
    return getattr(BACKBONES.get(name), "attention", False) if name in BACKBONES else name in timm_vit_names()


def is_vit(name: str) -> bool:
    """A timm VisionTransformer (ViT heads and attention callbacks apply): a registered backbone of kind
    'vit' (the attention-less raw-pixel baseline is one in shape) or any timm ViT name."""
    return backbone_kind(name) == "vit" if name in BACKBONES else name in timm_vit_names()


def check_backbone_name(name: str) -> None:
    if name not in BACKBONES and name not in timm_vit_names():
        raise UnknownNameError(
            "backbone", name, BACKBONES.names(),
            hint="or any timm ViT name, e.g. vit_small_patch16_224, vit_small_patch8_224.dino; "
            "python -c \"import timm; print(timm.list_models('vit_*', pretrained=True))\" lists them",
        )


def resolve_architecture(cfg: BackboneConfig) -> dict[str, int]:
    """The effective depth / embed_dim / num_heads / patch_size of a ViT-shaped backbone (:func:`is_vit`): what
    its registry entry says (``architecture=``), else the named timm model's with the overrides applied."""
    architecture = getattr(BACKBONES.get(cfg.name), "architecture", None) if cfg.name in BACKBONES else None
    return architecture(cfg) if architecture is not None else vit_architecture(cfg)


RESNET_OUTPUT_STRIDE = 32


def input_granularity(cfg: BackboneConfig) -> int:
    """The input size step the backbone's features see: a ViT's patch size, ResNet-50's output stride (32).
    DINO's automatic local crop size is a multiple of it (datamodules/multicrop.py)."""
    return resolve_architecture(cfg)["patch_size"] if is_vit(cfg.name) else RESNET_OUTPUT_STRIDE


def check_backbone_config(cfg: Hparams) -> Optional[str]:
    """The chosen backbone's own check of ``cfg`` (its registry entry's ``check_config``), or None; a timm ViT
    name has no entry of its own and none."""
    check = getattr(BACKBONES.get(cfg.backbone.name), "check_config", None) if cfg.backbone.name in BACKBONES else None
    return check(cfg) if check is not None else None


def build_backbone(cfg: BackboneConfig, img_size: int) -> nn.Module:
    check_backbone_name(cfg.name)
    if cfg.name in BACKBONES:
        return BACKBONES.get(cfg.name)(cfg, img_size)
    return build_vit(cfg, img_size)
