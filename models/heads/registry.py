"""The ViT segmentation-head registry and what every head shares.

A head is registered as a factory::

    @HEADS.register("name")
    def build(in_dim: int, num_classes: int, patch_size: int, cfg: SegmentationConfig,
              num_levels: int = 1) -> nn.Module: ...

The module maps ``features``, a list of patch-token grids (B, in_dim, h, w) (CLS token dropped), one per
consumed ViT block in ascending block order, to logits (B, num_classes, h_out, w_out). The caller upsamples
the logits bilinearly to the input size. A head with auxiliary heads (SETR's, ``--segmentation.aux_loss``)
returns ``(logits, [aux logits, ...])`` in training mode (see :func:`with_aux`); each auxiliary output is
upsampled and trained like the main one, with weight ``--segmentation.aux_weight``.

The grids are the blocks' outputs after the ViT's final LayerNorm, unless the module sets
``backbone_norm = False``: then it gets the raw block outputs and normalises them itself, as SETR's heads
do with a trainable LayerNorm of their own (:class:`TokenLayerNorm`).

``num_levels`` is ``len(head_levels(name, depth, cfg))``; a factory that consumes several blocks carries a
``levels(depth, cfg) -> list[int]`` attribute saying which (see ``models.heads.head_levels``), every other
head consumes the last block only.

What the registry line says about the head (``@HEADS.register("name", ...)``, each keyword optional), read by
``models.segmenters`` and ``config.validation`` before anything is built:

* ``levels=``: as above.
* ``aux_heads=True``: it has auxiliary heads, so ``--segmentation.aux_loss`` applies to it.
* ``classifier_dropout=True``: it applies ``--segmentation.classifier_dropout``.
* ``needs_attention=True``: it also gets the backbone's attention (see ``models.heads``).
* ``check_config=f``: ``f(cfg: Hparams) -> Optional[str]``, its own check of a config that chose it (a
  one-line problem naming the flag, or None). Every head reads ViT patch tokens, so it needs a ViT backbone.

Adding a head is this one file plus its import line in ``models/heads/__init__.py``.
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


def classifier(in_dim: int, num_classes: int, kernel_size: int = 1) -> nn.Conv2d:
    """The final conv (1×1 unless asked): small random weights (mmseg's conv_seg init, normal std 0.01; not
    zero, so gradients reach the features), bias 0."""
    conv = nn.Conv2d(in_dim, num_classes, kernel_size, padding=kernel_size // 2)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def classifier_dropout(p: float) -> nn.Module:
    """mmseg's dropout before a decode head's classifier (``nn.Dropout2d``: whole channels; its
    BaseDecodeHead default is 0.1, SETR's own heads and mmseg's current SETR configs use none)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"classifier dropout must be in [0, 1), got {p}")
    return nn.Dropout2d(p) if p > 0 else nn.Identity()


class TokenLayerNorm(nn.LayerNorm):
    """LayerNorm of every patch token of a (B, C, h, w) grid over its C channels, with SETR's eps 1e-6: the
    trainable norm SETR's heads apply to the raw output of the ViT block they read."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def with_aux(main: Tensor, aux: list[Tensor]) -> Tensor | tuple[Tensor, list[Tensor]]:
    """A head's return value: the logits, or ``(logits, auxiliary logits)`` when it has auxiliary heads
    (computed in training mode only: their losses train, their predictions are never evaluated)."""
    return (main, aux) if aux else main
