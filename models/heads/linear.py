"""Linear head: a per-patch linear classifier on the last block's patch tokens (a linear probe).

The baseline below SETR's heads (Zheng et al., "Rethinking Semantic Segmentation from a
Sequence-to-Sequence Perspective with Transformers", CVPR 2021): logits at patch resolution.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from models.heads.registry import HEADS, check_single_level, classifier, single_feature


class LinearHead(nn.Module):
    num_levels = 1

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.classifier = classifier(in_dim, num_classes)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.classifier(single_feature(features))


@HEADS.register("linear")
def build(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1) -> nn.Module:
    check_single_level("linear", num_levels)
    return LinearHead(in_dim, num_classes)
