"""The ViT segmentation-head registry and what every head shares.

A head is registered as a factory::

    @HEADS.register("name")
    def build(in_dim: int, num_classes: int, patch_size: int, cfg: SegmentationConfig,
              num_levels: int = 1) -> nn.Module: ...

The module maps ``features``, a list of patch-token grids (B, in_dim, h, w) (CLS token dropped), one per
consumed ViT block in ascending block order, to logits (B, num_classes, h_out, w_out). The caller upsamples
the logits bilinearly to the input size. ``num_levels`` is ``len(head_levels(name, depth, cfg))``; a factory
that consumes several blocks carries a ``levels(depth, cfg) -> list[int]`` attribute saying which (see
``models.heads.head_levels``), every other head consumes the last block only.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from utils.registry import Registry

HEADS: Registry = Registry("head")


def last_block(depth: int, cfg=None) -> list[int]:
    """The levels of a single-level head: the last block's output."""
    return [depth - 1]


def check_single_level(name: str, num_levels: int) -> None:
    if num_levels != 1:
        raise ValueError(f"head {name!r} consumes one ViT block, got num_levels={num_levels}")


def single_feature(features: Sequence[Tensor]) -> Tensor:
    if len(features) != 1:
        raise ValueError(f"this head takes a list of one feature grid, got {len(features)}")
    return features[0]


def conv_norm_relu(in_dim: int, out_dim: int, kernel_size: int) -> nn.Sequential:
    """conv (no bias: the BatchNorm has one) + BatchNorm2d (SyncBN in SETR) + ReLU, shape-preserving."""
    conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))


def classifier(in_dim: int, num_classes: int) -> nn.Conv2d:
    """The final 1×1 conv: small random weights (not zero, so gradients reach the features), bias 0."""
    conv = nn.Conv2d(in_dim, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv
