"""SETR-PUP head (Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence
Perspective with Transformers", CVPR 2021; official code fudan-zvg/SETR ``VisionTransformerUpHead``,
mmsegmentation ``SETRUPHead``): progressive upsampling of the last block's patch tokens.

The raw output of the last block → a trainable LayerNorm per token (eps 1e-6, SETR's own; the ViT's final
norm is not used) → log2(patch_size) stages of 3×3 conv + BatchNorm + ReLU + ×2 bilinear upsampling (the
first conv in_dim → hidden_dim, the others hidden_dim → hidden_dim) → optional Dropout2d
(``--segmentation.classifier_dropout``, mmseg's) → 1×1 classifier: logits at h·patch × w·patch, the input
resolution. 4 stages for /16 as SETR (whose code hard-codes 4), 3 for /8.

Auxiliary heads (``--segmentation.aux_loss``, weight ``--segmentation.aux_weight`` = SETR's 0.4), as in the
official SETR-PUP configs: one per block of ``--segmentation.aux_blocks`` (default: SETR's ViT-L blocks
10, 15, 20, 24 of 24, scaled to the depth) and on the last block, each a LayerNorm → 3×3 conv (hidden_dim)
+ BatchNorm + ReLU → ×4 bilinear upsampling → 1×1 classifier.

The convolutions followed by a BatchNorm have no bias (SETR's have one, which the BatchNorm cancels):
hidden_dim fewer parameters per conv than the official code, the same function.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from models.heads.registry import HEADS, TokenLayerNorm, classifier, classifier_dropout, conv_norm_relu, with_aux

AUX_FLAG = "--segmentation.aux_blocks"
SETR_DEPTH = 24
SETR_AUX_BLOCKS = (10, 15, 20, 24)  # 1-based blocks of ViT-L that carry SETR-PUP's auxiliary heads


def num_stages(patch_size: int) -> int:
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"setr_pup upsamples in ×2 stages: the patch size must be a power of 2 ≥ 2, "
                         f"got {patch_size}")
    return patch_size.bit_length() - 1


def aux_blocks(depth: int, cfg) -> list[int]:
    """The 0-based blocks with an auxiliary head: ``cfg.aux_blocks`` ("4,6,9"), else SETR's ViT-L choice
    scaled to ``depth`` (block k·depth // 24 for k = 10, 15, 20, 24: 9, 14, 19, 23 for depth 24; 4, 6, 9, 11
    for depth 12); the last block always carries one, as in SETR. Sorted, without repeats."""
    spec = (getattr(cfg, "aux_blocks", "") or "").strip()
    if not spec:
        return sorted({k * depth // SETR_DEPTH - 1 for k in SETR_AUX_BLOCKS if k * depth // SETR_DEPTH >= 1}
                      | {depth - 1})
    blocks: set[int] = set()
    for item in spec.split(","):
        try:
            block = int(item.strip())
        except ValueError:
            raise ValueError(f"{AUX_FLAG}={spec!r}: {item.strip()!r} is not an integer block index") from None
        if not 0 <= block < depth:
            raise ValueError(f"{AUX_FLAG}={spec!r}: block {block} is out of range for a {depth}-block ViT "
                             f"(0-based, 0..{depth - 1})")
        blocks.add(block)
    return sorted(blocks | {depth - 1})


def pup_levels(depth: int, cfg) -> list[int]:
    """The blocks setr_pup reads: the last one, plus the auxiliary heads' blocks with aux_loss."""
    return aux_blocks(depth, cfg) if getattr(cfg, "aux_loss", False) else [depth - 1]


class SETRUpAuxHead(nn.Sequential):
    """SETR-PUP's auxiliary head (``VisionTransformerUpHead`` with num_conv=2, num_upsampe_layer=2):
    LayerNorm → 3×3 conv + BatchNorm + ReLU → ×4 bilinear → 1×1 classifier."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int):
        super().__init__(TokenLayerNorm(in_dim), conv_norm_relu(in_dim, hidden_dim, 3),
                         nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False),
                         classifier(hidden_dim, num_classes))


class SETRPUPHead(nn.Module):
    backbone_norm = False  # raw block outputs: the head's own LayerNorm, as SETR

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int, patch_size: int, dropout: float = 0.0,
                 num_aux: int = 0):
        super().__init__()
        self.norm = TokenLayerNorm(in_dim)
        dims = [in_dim] + [hidden_dim] * num_stages(patch_size)
        self.stages = nn.Sequential(*(
            nn.Sequential(conv_norm_relu(d_in, d_out, 3),
                          nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            for d_in, d_out in zip(dims[:-1], dims[1:])
        ))
        self.dropout = classifier_dropout(dropout)
        self.classifier = classifier(hidden_dim, num_classes)
        self.aux = nn.ModuleList(SETRUpAuxHead(in_dim, hidden_dim, num_classes) for _ in range(num_aux))
        self.num_levels = max(1, num_aux)

    def forward(self, features: Sequence[Tensor]) -> Tensor | tuple[Tensor, list[Tensor]]:
        if len(features) != self.num_levels:
            raise ValueError(f"setr_pup was built for {self.num_levels} feature grid(s), got {len(features)}")
        logits = self.classifier(self.dropout(self.stages(self.norm(features[-1]))))
        aux = [head(x) for head, x in zip(self.aux, features)] if self.training else []
        return with_aux(logits, aux)


@HEADS.register("setr_pup", levels=pup_levels, aux_heads=True, classifier_dropout=True)
def build(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1) -> nn.Module:
    aux = bool(getattr(cfg, "aux_loss", False))
    if not aux and num_levels != 1:
        raise ValueError(f"setr_pup without aux_loss consumes one ViT block, got num_levels={num_levels}")
    return SETRPUPHead(in_dim, num_classes, cfg.hidden_dim, patch_size, getattr(cfg, "classifier_dropout", 0.0),
                       num_aux=num_levels if aux else 0)

