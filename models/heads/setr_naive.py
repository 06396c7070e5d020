"""SETR-Naive head (Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence
Perspective with Transformers", CVPR 2021): a per-patch two-layer MLP on the last block's patch tokens,
1×1 conv (hidden_dim, SETR: 256) → BatchNorm → ReLU → 1×1 conv; logits at patch resolution.

As SETR's official naive head (``VisionTransformerUpHead`` with num_conv=2, 1×1 kernels) except that its
input is the ViT's final LayerNorm output instead of a LayerNorm of the head's own (both normalise each
token; only the affine parameters differ, and the 1×1 conv absorbs them), and that the conv before the
BatchNorm has no bias. The report's variant (hidden width = the embedding width) is
``setr_pytorch_naive``."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from models.heads.registry import HEADS, check_single_level, classifier, conv_norm_relu, single_feature


class SETRNaiveHead(nn.Module):
    num_levels = 1

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int):
        super().__init__()
        self.hidden = conv_norm_relu(in_dim, hidden_dim, 1)
        self.classifier = classifier(hidden_dim, num_classes)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.hidden(single_feature(features)))


@HEADS.register("setr_naive")
def build(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1) -> nn.Module:
    check_single_level("setr_naive", num_levels)
    return SETRNaiveHead(in_dim, num_classes, cfg.hidden_dim)
