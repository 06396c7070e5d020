"""CLS-token attention of timm ViTs, and DINO's mass-threshold masks.

Training keeps timm's fused attention (``F.scaled_dot_product_attention``) on, and fused attention never
materialises the attention probabilities. :func:`cls_attention` therefore recomputes them from the block's
own weights: one forward pass (no gradients, eval mode) stops at the input of the requested block's
attention module, then ``softmax(q_cls · kᵀ · scale)`` is evaluated for the CLS query only, exactly as the
unfused timm code path does (``qkv`` projection, ``q_norm``/``k_norm``, scale, softmax). ``fused_attn`` is
never touched.

The full matrix (every query, not only the CLS one) is what attention-aware segmentation heads read:
:func:`recorded_attention_inputs` records the attention inputs of chosen blocks during *any* forward pass of
the model (so a segmenter gets its features and the attention from one backbone pass),
:func:`block_attention` turns a recorded input into a :class:`BlockAttention` (the softmax probabilities
plus where the prefix tokens end and the patch grid), and :func:`block_attentions` does both for a batch
of images on its own, like :func:`cls_attentions`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["BlockAttention", "attention_probabilities", "block_attention", "block_attentions", "cls_attention",
           "cls_attentions", "mass_threshold_masks", "peak_to_mean", "recorded_attention_inputs", "relative_to_uniform",
           "resolve_block"]


class _Stop(Exception):
    """Raised by a hook once every requested attention input is captured (skips the remaining blocks)."""


def resolve_block(vit: nn.Module, block: int) -> int:
    """A 0-based block index (negative counts from the end), or IndexError naming the valid range."""
    depth = len(vit.blocks)
    if not -depth <= block < depth:
        raise IndexError(f"block {block} is out of range for a {depth}-block ViT "
                         f"(valid: 0..{depth - 1}, or -{depth}..-1 from the end)")
    return block % depth


def _check_inputs(vit: nn.Module, images: Tensor) -> tuple[int, int]:
    """The patch grid (rows, cols) of ``images``, or a ValueError saying why they cannot go through ``vit``."""
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("cls_attention needs a ViT with a class token (this model has class_token=False)")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    ph, pw = vit.patch_embed.patch_size
    height, width = images.shape[-2:]
    if height % ph or width % pw:
        raise ValueError(f"input size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
    model_size = getattr(vit.patch_embed, "img_size", None)
    if not getattr(vit, "dynamic_img_size", False) and model_size is not None \
            and tuple(model_size) != (height, width):
        raise ValueError(f"input size {height}x{width} differs from the model's {model_size[0]}x{model_size[1]} and "
                         "the model was built without dynamic_img_size=True: create it with "
                         f"img_size={height} or dynamic_img_size=True (the position embedding is then resampled)")
    return height // ph, width // pw


def _attention_module(vit: nn.Module, index: int) -> nn.Module:
    attn = getattr(vit.blocks[index], "attn", None)
    if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
        raise ValueError(f"block {index} ({type(vit.blocks[index]).__name__}) has no timm-style attention module "
                         "with a fused qkv projection; its attention cannot be recomputed")
    return attn


def _cls_row(attn: nn.Module, x: Tensor) -> Tensor:
    """Softmax attention of the CLS query (token 0) over all tokens: (B, heads, N), float32."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, heads, 1, N)
    return logits.softmax(dim=-1)[:, :, 0]


@torch.no_grad()
def cls_attentions(vit: nn.Module, images: Tensor, blocks: Iterable[int]) -> dict[int, Tensor]:
    """:func:`cls_attention` for several blocks from one forward pass: {0-based block index: map}.

    Keys are the resolved (non-negative) indices of ``blocks``.
    """
    indices = sorted({resolve_block(vit, b) for b in blocks})
    if not indices:
        return {}
    rows, cols = _check_inputs(vit, images)
    modules = {i: _attention_module(vit, i) for i in indices}
    prefix = vit.num_prefix_tokens
    captured: dict[int, Tensor] = {}
    last = indices[-1]

    def hook_for(index: int):
        def hook(module, args):
            captured[index] = args[0]
            if index == last:
                raise _Stop
        return hook

    # Eval mode (no dropout, drop path or patch dropout), every submodule's own mode restored afterwards.
    modes = [(m, m.training) for m in vit.modules()]
    handles = [modules[i].register_forward_pre_hook(hook_for(i)) for i in indices]
    try:
        vit.eval()
        weight = vit.patch_embed.proj.weight
        try:
            vit.forward_features(images.to(device=weight.device, dtype=weight.dtype))
        except _Stop:
            pass
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
    if set(captured) != set(indices):
        raise RuntimeError(f"forward_features did not reach the attention of blocks {sorted(set(indices) - set(captured))}")

    out = {}
    for i in indices:
        row = _cls_row(modules[i], captured[i])
        if row.shape[-1] != prefix + rows * cols:
            raise RuntimeError(f"block {i} sees {row.shape[-1]} tokens, expected {prefix} prefix + {rows}x{cols} patches")
        out[i] = row[..., prefix:].reshape(row.shape[0], row.shape[1], rows, cols)
    return out


def cls_attention(vit: nn.Module, images: Tensor, block: int = -1) -> Tensor:
    """CLS-token attention of one block of a timm VisionTransformer, per head, on the patch grid.

    Returns ``(B, heads, H/p, W/p)`` float32: row 0 (the CLS query) of block ``block``'s softmax attention
    (negative indices count from the end), restricted to the patch columns and *not* renormalised — as in
    DINO, these entries plus the CLS→prefix-token entries (CLS itself, registers) sum to 1 per head.

    Works with fused attention left on (probabilities are recomputed from the block's ``qkv``, ``q_norm``,
    ``k_norm`` and ``scale``), under ``torch.no_grad()`` and in eval mode (the model's modes are restored),
    for any patch size, any input size that is a multiple of it (models built with
    ``dynamic_img_size=True``; otherwise only the model's own size, else ValueError), and any number of
    register tokens. A model without a class token raises ValueError; a block out of range, IndexError.
    """
    index = resolve_block(vit, block)
    return cls_attentions(vit, images, [index])[index]


def mass_threshold_masks(attn: Tensor, keep: float = 0.6) -> Tensor:
    """DINO's ``th_attn``: per map (the last two dims), the smallest set of patches holding ≥ ``keep`` of its mass.

    Definition: sort a map's values in descending order (a stable sort, so among equal values the patch
    that comes first in row-major order wins: deterministic), and keep the shortest prefix whose sum is
    at least ``keep · total``. Equivalently, a patch is kept iff the mass of the patches sorted before it
    is still below ``keep · total``. So the kept mass is ≥ ``keep · total``, and dropping the smallest kept
    patch leaves less than that (minimal; no set with fewer patches reaches the fraction either).

    ``keep=1`` keeps exactly the patches with positive mass; ``keep=0`` and all-zero maps keep nothing.
    Values are expected non-negative (attention). Returns a bool tensor of ``attn``'s shape.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be a fraction in [0, 1], got {keep}")
    if attn.ndim < 2:
        raise ValueError(f"attn must have at least 2 dims (..., H, W), got shape {tuple(attn.shape)}")
    if keep >= 1.0:
        return attn > 0  # exact, unaffected by rounding of the cumulative sum
    flat = attn.detach().reshape(*attn.shape[:-2], -1).double()
    values, order = torch.sort(flat, dim=-1, descending=True, stable=True)
    cumulative = values.cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    kept_sorted = before < keep * cumulative[..., -1:]
    mask = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return mask.reshape(attn.shape)



def relative_to_uniform(attn: Tensor) -> Tensor:
    """Each map (the last two dims) divided by its own mean: 1 everywhere for uniform attention, k on a patch
    that gets k times its uniform share. Comparable across maps, heads, images and models of any grid size,
    so pictures can share one colour scale. An all-zero map stays 0."""
    mean = attn.float().mean(dim=(-2, -1), keepdim=True)
    return torch.where(mean > 0, attn.float() / mean.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(mean))


def peak_to_mean(attn: Tensor) -> Tensor:
    """The flatness of each map (the last two dims): its maximum over its mean, 1 for perfectly uniform
    attention, the number of patches for attention on a single patch; 0 for an all-zero map. Shape
    ``attn.shape[:-2]``."""
    return relative_to_uniform(attn).amax(dim=(-2, -1))


# ------------------------------------------------------------------------------ full attention matrices
@dataclass(frozen=True)
class BlockAttention:
    """The softmax attention of one block: ``probs`` (B, heads, N, N) float32, rows are queries and sum to 1,
    over N = ``num_prefix_tokens`` (CLS, registers) + rows·cols patch tokens in timm's order."""

    probs: Tensor
    num_prefix_tokens: int
    grid: tuple[int, int]

    @property
    def cls(self) -> Tensor:
        """CLS → patch attention (B, heads, rows, cols), not renormalised: what :func:`cls_attention` returns."""
        p = self.num_prefix_tokens
        return self.probs[:, :, 0, p:].reshape(*self.probs.shape[:2], *self.grid)

    @property
    def patches(self) -> Tensor:
        """Patch → patch attention (B, heads, n, n), n = rows·cols in row-major order, query first; not
        renormalised (each row plus the patch's attention to the prefix tokens sums to 1)."""
        p = self.num_prefix_tokens
        return self.probs[:, :, p:, p:]


def attention_probabilities(attn: nn.Module, x: Tensor) -> Tensor:
    """``softmax(q · kᵀ · scale)`` of a timm attention module for its input ``x`` (B, N, dim): (B, heads, N, N).

    The same computation as :func:`cls_attention` for every query instead of the CLS one (``qkv``,
    ``q_norm``/``k_norm``, scale), with the logits and softmax in float32 even under autocast (the
    ``qkv`` projection itself runs as the model runs it). Gradients flow when ``x`` carries them.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
        return logits.softmax(dim=-1)


@contextmanager
def recorded_attention_inputs(vit: nn.Module, blocks: Iterable[int]) -> Iterator[dict[int, Tensor]]:
    """Within the ``with`` block, every forward pass of ``vit`` records the input of the attention module of
    ``blocks`` (0-based, negative from the end) into the yielded dict {resolved index: (B, N, dim)}; a later
    pass overwrites an earlier one. The hooks only read: the forward pass (fused attention included) is
    unchanged, and they are removed on exit."""
    indices = sorted({resolve_block(vit, b) for b in blocks})
    captured: dict[int, Tensor] = {}

    def hook_for(index: int):
        def hook(module, args):
            captured[index] = args[0]
        return hook

    handles = [_attention_module(vit, i).register_forward_pre_hook(hook_for(i)) for i in indices]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def block_attention(vit: nn.Module, block: int, x: Tensor, grid: tuple[int, int]) -> BlockAttention:
    """The :class:`BlockAttention` of block ``block`` from its recorded attention input ``x`` (see
    :func:`recorded_attention_inputs`) on a rows × cols patch grid; RuntimeError if the token count differs."""
    index = resolve_block(vit, block)
    prefix = vit.num_prefix_tokens
    rows, cols = grid
    if x.shape[1] != prefix + rows * cols:
        raise RuntimeError(f"block {index} sees {x.shape[1]} tokens, expected {prefix} prefix + {rows}x{cols} patches")
    return BlockAttention(attention_probabilities(_attention_module(vit, index), x), prefix, (rows, cols))


@torch.no_grad()
def block_attentions(vit: nn.Module, images: Tensor, blocks: Iterable[int]) -> dict[int, BlockAttention]:
    """The full attention of several blocks from one forward pass (no gradients, eval mode, the model's modes
    restored, stopping after the last requested block): {resolved block index: :class:`BlockAttention`}.
    Same input checks as :func:`cls_attention`; ``result[i].cls`` equals ``cls_attention(vit, images, i)``."""
    indices = sorted({resolve_block(vit, b) for b in blocks})
    if not indices:
        return {}
    grid = _check_inputs(vit, images)
    modes = [(m, m.training) for m in vit.modules()]
    try:
        vit.eval()
        weight = vit.patch_embed.proj.weight
        with recorded_attention_inputs(vit, indices) as inputs:
            vit.forward_intermediates(images.to(device=weight.device, dtype=weight.dtype), indices=[indices[-1]],
                                      stop_early=True, intermediates_only=True)
    finally:
        for module, mode in modes:
            module.training = mode
    return {i: block_attention(vit, i, inputs[i], grid) for i in indices}
