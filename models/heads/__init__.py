"""ViT semantic-segmentation heads (SETR, Zheng et al., CVPR 2021), selected by name.

``HEADS.get(name)(in_dim, num_classes, patch_size, cfg, num_levels=len(levels))`` builds a head, where
``levels = head_levels(name, depth, cfg)`` are the ViT blocks whose patch-token grids it consumes, e.g.
``vit.forward_intermediates(x, indices=levels, output_fmt="NCHW", intermediates_only=True)``.
Heads: 'linear', 'setr_naive', 'setr_pup', 'setr_mla' (SETR's official designs), 'setr_pytorch_naive' and
'setr_pytorch_pup' (the setr-pytorch variants the report used), 'attn_fusion' (see ``registry.py`` for the
protocol; parameter counts next to the reference implementations' in docs/heads.md).

A factory with ``needs_attention = True`` ('attn_fusion') is also given ``num_heads=`` (the backbone's
attention heads per block), and its module is called as ``head(features, attentions)`` with the softmax
attention of the same blocks (``analysis.attention.BlockAttention``).
"""
from __future__ import annotations

# Registration order is the order messages list heads in (SETR's own: naive, PUP, MLA); --help lists them sorted.
from models.heads import attn_fusion as _attn_fusion  # noqa: F401  (registers 'attn_fusion')
from models.heads import linear as _linear  # noqa: F401  (registers 'linear')
from models.heads import setr_naive as _setr_naive  # noqa: F401  (registers 'setr_naive')
from models.heads import setr_pup as _setr_pup  # noqa: F401  (registers 'setr_pup')
from models.heads import setr_mla as _setr_mla  # noqa: F401  (registers 'setr_mla')
from models.heads import setr_pytorch as _setr_pytorch  # noqa: F401  (registers 'setr_pytorch_naive', '..._pup')
from models.heads.registry import HEADS, last_block

__all__ = ["HEADS", "head_levels"]


def head_levels(name: str, depth: int, cfg) -> list[int]:
    """The 0-based ViT block indices (ascending) whose outputs head ``name`` consumes: the last block for
    single-level heads, ``cfg.mla_blocks`` (or 4 evenly spaced blocks ending with the last) for setr_mla,
    the last block plus ``cfg.aux_blocks`` for setr_pup with ``cfg.aux_loss``.
    Raises UnknownNameError for an unknown head, ValueError for an invalid ``--segmentation.mla_blocks``."""
    factory = HEADS.get(name)
    if depth < 1:
        raise ValueError(f"a ViT has at least one block, got depth={depth}")
    return getattr(factory, "levels", last_block)(depth, cfg)
