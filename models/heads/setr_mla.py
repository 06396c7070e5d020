"""SETR-MLA head (Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence
Perspective with Transformers", CVPR 2021): multi-level feature aggregation over several ViT blocks.

Per level (ascending block order): 1×1 conv in_dim → hidden + BatchNorm + ReLU. Top-down aggregation,
deepest level first: agg[L-1] = p[L-1], agg[i] = p[i] + agg[i+1]. Per level 3×3 conv + BatchNorm + ReLU
on agg[i]. Concatenation of the L levels (L·hidden channels), then a 1×1 classifier conv. All levels share
the ViT's patch grid, so the logits stay at patch resolution (SETR's per-level ×4 upsampling before the
concatenation is left to the caller's final bilinear upsampling, which gives the same linear
interpolation of the classifier output at a fraction of the memory).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from models.heads.registry import HEADS, classifier, conv_norm_relu

MLA_FLAG = "--segmentation.mla_blocks"
DEFAULT_LEVELS = 4


def mla_levels(depth: int, cfg) -> list[int]:
    """The 0-based blocks to aggregate: ``cfg.mla_blocks`` ("2,5,8,11"), sorted, or by default 4 evenly
    spaced blocks ending with the last (depth 12 → [2, 5, 8, 11]; depth < 4 → every block)."""
    spec = (cfg.mla_blocks or "").strip()
    if not spec:
        n = min(DEFAULT_LEVELS, depth)
        return [(i + 1) * depth // n - 1 for i in range(n)]
    blocks: list[int] = []
    for item in spec.split(","):
        try:
            block = int(item.strip())
        except ValueError:
            raise ValueError(f"{MLA_FLAG}={spec!r}: {item.strip()!r} is not an integer block index") from None
        if not 0 <= block < depth:
            raise ValueError(f"{MLA_FLAG}={spec!r}: block {block} is out of range for a {depth}-block ViT "
                             f"(0-based, 0..{depth - 1})")
        if block in blocks:
            raise ValueError(f"{MLA_FLAG}={spec!r}: block {block} is listed twice")
        blocks.append(block)
    return sorted(blocks)


class SETRMLAHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int, num_levels: int):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"setr_mla needs at least one level, got num_levels={num_levels}")
        self.num_levels = num_levels
        self.proj = nn.ModuleList(conv_norm_relu(in_dim, hidden_dim, 1) for _ in range(num_levels))
        self.fuse = nn.ModuleList(conv_norm_relu(hidden_dim, hidden_dim, 3) for _ in range(num_levels))
        self.classifier = classifier(num_levels * hidden_dim, num_classes)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != self.num_levels:
            raise ValueError(f"setr_mla was built for {self.num_levels} levels, got {len(features)} feature grids")
        projected = [proj(x) for proj, x in zip(self.proj, features)]
        aggregated = [projected[-1]]
        for p in reversed(projected[:-1]):  # top-down: deepest first
            aggregated.append(p + aggregated[-1])
        aggregated.reverse()  # back to ascending block order
        return self.classifier(torch.cat([fuse(a) for fuse, a in zip(self.fuse, aggregated)], dim=1))


@HEADS.register("setr_mla")
def build(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1) -> nn.Module:
    return SETRMLAHead(in_dim, num_classes, cfg.hidden_dim, num_levels)


build.levels = mla_levels  # read by models.heads.head_levels
