"""Attention-fusion head: the frozen ViT's own attention, turned into per-patch feature maps and fused with
the patch tokens — the decoder the report proposes (§1.3: "extract and convert the per-patch attention to
feature maps and then fuse them with the patch embeddings") and did not have time to build.

Input: the last block's patch-token grid (B, D, h, w) and that block's softmax attention
(:class:`analysis.attention.BlockAttention`, the real probabilities recomputed from the block's weights, see
``analysis/attention.py``). Per attention head, :func:`attention_maps` makes ``MAPS_PER_HEAD`` = 7 maps on the
patch grid:

1. ``cls``: CLS → patch attention, ``log1p(n·a)`` (n patches, so uniform attention gives log 2). The maps
   DINO shows to segment objects without labels; the log compresses the softmax's exponential, so a few
   dominant patches do not squash the rest to zero.
2. ``prefix``: the attention the patch, as a query, pays to the prefix tokens (CLS, registers): where
   patches with nothing specific to look at (background) can park their attention.
3. ``entropy``: entropy of the patch's attention over the patches (renormalised), divided by log n — 0 for
   a patch that looks at one patch, 1 for one that looks everywhere: focused object parts vs diffuse
   background.
4. ``offset_y``, 5. ``offset_x``: the attention-weighted mean position of the patches it looks at, minus its
   own position, in image-relative units — inside an object whose patches attend to each other this points
   to the object's centre.
6. ``spread``: the standard deviation of that position (image-relative): about the size of the region the
   patch attends to, the object's extent for an object patch.
7. ``attended_cls``: ``log1p`` of the CLS map (×n) averaged with the patch's own attention weights — one
   step of attention propagation, which denoises the CLS map inside objects.

Why these and not the full n × n matrix, or the attention paid to a few fixed pooled regions: the patch →
patch summary must be a fixed number of channels for any input size (the grid changes with the image),
and a per-patch head cannot use "attention to the top-left quadrant" in a translation-invariant way.
The first and second spatial moments of each row (maps 4–6: the projection of the row on the bases
1, y, x, y² + x², taken relative to the query) and its entropy are translation-equivariant, size-independent,
cheap (matrix–vector products), and say *where* and *how widely* a patch looks; map 7 says *whether what
it looks at is salient*. Seven maps per head are few channels beside the tokens (42 against 384 for
ViT-S), so the head stays close to SETR-naive's parameter budget: SETR-naive's count on D + 7·heads input channels plus 2·7·heads for the
maps' BatchNorm (ViT-S, hidden 256: 115,049 against 104,213 for SETR-naive).

Fusion and decoding: the attention maps go through a BatchNorm (their scales differ by orders of
magnitude, and the tokens are LayerNorm-ed), are concatenated with the tokens, and decoded as SETR-naive
decodes the tokens alone: 1×1 conv → BatchNorm → ReLU → 1×1 classifier; logits at patch resolution, the
segmenter upsamples them bilinearly. With zero weights on the attention channels the head *is* SETR-naive,
so the comparison with it measures what the attention adds.

Protocol (besides the registry's): ``needs_attention = True`` on the factory and the module; the factory
takes ``num_heads`` (the backbone's attention heads per block); ``forward(features, attentions)`` gets one
:class:`BlockAttention` per feature grid (see ``models.segmenters.ViTSegmenter``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from models.heads.registry import HEADS, check_single_level, classifier, conv_norm_relu, single_feature
from analysis.attention import BlockAttention

MAP_NAMES = ("cls", "prefix", "entropy", "offset_y", "offset_x", "spread", "attended_cls")
MAPS_PER_HEAD = len(MAP_NAMES)


def patch_positions(rows: int, cols: int, device=None) -> Tensor:
    """(rows·cols, 2) patch centres (y, x) in row-major order, in image-relative units (0..1)."""
    y = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows
    x = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
    return torch.cartesian_prod(y, x)


def attention_maps(att: BlockAttention) -> Tensor:
    """The per-patch attention maps of one block: (B, heads · 7, rows, cols) float32, grouped by head
    (head 0's seven maps in ``MAP_NAMES`` order first). See the module docstring for what each map is."""
    rows, cols = att.grid
    n = rows * cols
    patches = att.patches.float()  # (B, H, n, n): query patch → key patch
    batch, heads = patches.shape[:2]
    mass = patches.sum(dim=-1)  # attention the query pays to patches; the rest went to the prefix tokens
    p = patches / mass.clamp_min(1e-12).unsqueeze(-1)
    entropy = torch.special.entr(p).sum(dim=-1) / max(math.log(n), 1e-12)  # entr(x) = -x log x; n = 1: 0
    pos = patch_positions(rows, cols, device=p.device)  # (n, 2)
    cls = att.cls.float().reshape(batch, heads, n) * n  # uniform attention → 1
    # One batched product gives every expectation under each query's attention: E[y], E[x], E[y² + x²], E[cls].
    values = torch.cat([pos, pos.square().sum(dim=-1, keepdim=True)], dim=-1).expand(batch, heads, n, 3)
    expect = p @ torch.cat([values, cls.unsqueeze(-1)], dim=-1)  # (B, H, n, 4)
    centroid = expect[..., :2]
    offset = centroid - pos
    spread = (expect[..., 2] - centroid.square().sum(dim=-1)).clamp_min(0).sqrt()
    maps = torch.stack([cls.log1p(), 1 - mass, entropy, offset[..., 0], offset[..., 1], spread,
                        expect[..., 3].log1p()], dim=2)  # (B, H, 7, n)
    return maps.reshape(batch, heads * MAPS_PER_HEAD, rows, cols)


class AttnFusionHead(nn.Module):
    num_levels = 1
    needs_attention = True

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int, num_heads: int):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"attn_fusion needs the backbone's number of attention heads (>= 1), got {num_heads}")
        self.num_heads = num_heads
        attn_channels = num_heads * MAPS_PER_HEAD
        self.attn_norm = nn.BatchNorm2d(attn_channels)
        self.hidden = conv_norm_relu(in_dim + attn_channels, hidden_dim, 1)
        self.classifier = classifier(hidden_dim, num_classes)

    def forward(self, features: Sequence[Tensor], attentions: Sequence[BlockAttention]) -> Tensor:
        tokens = single_feature(features)
        if len(attentions) != 1:
            raise ValueError(f"attn_fusion takes the attention of one block, got {len(attentions)}")
        att = attentions[0]
        if att.probs.shape[1] != self.num_heads:
            raise ValueError(f"attn_fusion was built for {self.num_heads} attention heads, got {att.probs.shape[1]}")
        if tuple(att.grid) != tuple(tokens.shape[-2:]):
            raise ValueError(f"attention grid {att.grid} differs from the feature grid {tuple(tokens.shape[-2:])}")
        maps = self.attn_norm(attention_maps(att)).to(tokens.dtype)
        return self.classifier(self.hidden(torch.cat([tokens, maps], dim=1)))


def check_config(cfg) -> Optional[str]:
    """attn_fusion's own check of a config that chose it: the backbone must have attention to fuse."""
    if cfg.backbone.name == "pixels":
        return ("--segmentation.head=attn_fusion fuses the backbone's attention, and --backbone.name=pixels (raw "
                "pixel patches) has none; use linear, setr_naive or setr_pup")
    return None


# needs_attention: models.segmenters passes num_heads= to the factory and the attentions to forward.
@HEADS.register("attn_fusion", needs_attention=True, check_config=check_config)
def build(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1,
          num_heads: Optional[int] = None) -> nn.Module:
    check_single_level("attn_fusion", num_levels)
    if num_heads is None:
        raise ValueError("attn_fusion needs num_heads= (the backbone's attention heads per block)")
    return AttnFusionHead(in_dim, num_classes, cfg.hidden_dim, num_heads)
