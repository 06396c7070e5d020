"""SETR-MLA head (Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence
Perspective with Transformers", CVPR 2021): multi-level feature aggregation over several ViT blocks, as the
official code builds it (fudan-zvg/SETR: ``Conv_MLA`` in its ViT-MLA backbone, ``MLAHead`` +
``VIT_MLAHead``, ``VIT_MLA_AUXIHead``; mmsegmentation splits the same layers into ``MLANeck`` and
``SETRMLAHead``). With C = hidden_dim (SETR: 256) and L levels (``--segmentation.mla_blocks``, default 4
evenly spaced blocks ending with the last, as SETR's 6, 12, 18, 24 of 24):

1. per level: the block's raw output → trainable LayerNorm per token (eps 1e-6) → 1×1 conv in_dim → C +
   BatchNorm + ReLU;
2. top-down aggregation, deepest level first: agg[L-1] = p[L-1], agg[i] = p[i] + agg[i+1];
3. per level: 3×3 conv C → C + BatchNorm + ReLU (the MLA outputs);
4. per level: 2 × (3×3 conv + BatchNorm + ReLU), C → C/2 → C/2 (SETR: 256 → 128 → 128), then ×4 bilinear
   upsampling (align_corners=True, as the official ``MLAHead``);
5. concatenation (L·C/2 channels) → optional Dropout2d (``--segmentation.classifier_dropout``, mmseg's) →
   3×3 classifier conv (the official ``VIT_MLAHead.cls``); the caller upsamples to the input size.

Auxiliary heads (``--segmentation.aux_loss``, weight ``--segmentation.aux_weight`` = SETR's 0.4): on each MLA
output (step 3) a 1×1 conv C → classes without bias (``VIT_MLA_AUXIHead``), upsampled to the input size.

The convolutions followed by a BatchNorm have no bias, as in SETR's MLA.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from models.heads.registry import HEADS, TokenLayerNorm, classifier, classifier_dropout, conv_norm_relu, with_aux

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
    backbone_norm = False  # raw block outputs: a LayerNorm of its own per level, as SETR

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int, num_levels: int, dropout: float = 0.0,
                 aux: bool = False):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"setr_mla needs at least one level, got num_levels={num_levels}")
        if hidden_dim < 2:
            raise ValueError(f"setr_mla halves hidden_dim in its per-level head; got hidden_dim={hidden_dim}")
        self.num_levels = num_levels
        head_dim = hidden_dim // 2
        self.norms = nn.ModuleList(TokenLayerNorm(in_dim) for _ in range(num_levels))
        self.proj = nn.ModuleList(conv_norm_relu(in_dim, hidden_dim, 1) for _ in range(num_levels))
        self.fuse = nn.ModuleList(conv_norm_relu(hidden_dim, hidden_dim, 3) for _ in range(num_levels))
        self.heads = nn.ModuleList(
            nn.Sequential(conv_norm_relu(hidden_dim, head_dim, 3), conv_norm_relu(head_dim, head_dim, 3),
                          nn.Upsample(scale_factor=4, mode="bilinear", align_corners=True))
            for _ in range(num_levels)
        )
        self.dropout = classifier_dropout(dropout)
        self.classifier = classifier(num_levels * head_dim, num_classes, kernel_size=3)
        self.aux = nn.ModuleList(nn.Conv2d(hidden_dim, num_classes, 1, bias=False) for _ in range(num_levels)) \
            if aux else nn.ModuleList()
        for conv in self.aux:
            nn.init.normal_(conv.weight, std=0.01)

    def forward(self, features: Sequence[Tensor]) -> Tensor | tuple[Tensor, list[Tensor]]:
        if len(features) != self.num_levels:
            raise ValueError(f"setr_mla was built for {self.num_levels} levels, got {len(features)} feature grids")
        projected = [proj(norm(x)) for norm, proj, x in zip(self.norms, self.proj, features)]
        aggregated = [projected[-1]]
        for p in reversed(projected[:-1]):  # top-down: deepest first
            aggregated.append(p + aggregated[-1])
        aggregated.reverse()  # back to ascending block order
        levels = [fuse(a) for fuse, a in zip(self.fuse, aggregated)]
        out = torch.cat([head(x) for head, x in zip(self.heads, levels)], dim=1)
        logits = self.classifier(self.dropout(out))
        aux = [head(x) for head, x in zip(self.aux, levels)] if self.training else []
        return with_aux(logits, aux)


@HEADS.register("setr_mla", levels=mla_levels, aux_heads=True, classifier_dropout=True)
def build(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1) -> nn.Module:
    return SETRMLAHead(in_dim, num_classes, cfg.hidden_dim, num_levels, getattr(cfg, "classifier_dropout", 0.0),
                       aux=bool(getattr(cfg, "aux_loss", False)))

