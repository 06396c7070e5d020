"""Effective receptive fields (Luo et al., 2017, "Understanding the Effective Receptive Field in Deep
Convolutional Neural Networks").

The ERF of a layer is the gradient of one output unit of that layer — the *centre* unit, summed over its
channels — with respect to the input pixels: ``|∂ y_centre / ∂ x|``, averaged over images and input
channels. It shows which input pixels actually influence the unit (for a CNN: a Gaussian-like blob much
smaller than the theoretical receptive field; for a ViT: global from the first block on).

* :func:`effective_receptive_field` computes the map for any model and any layer inside it;
  :func:`centre_patch_box` locates a ViT's centre patch in it.
* :func:`resolve_layers` turns a ``--callbacks.erf_layers`` spec into layers of our backbones (ViT block
  indices, ResNet stage names); :func:`erf_model` gives the module to differentiate. (The spec is checked from
  the config alone, before any weights exist, by ``callbacks.checks.check_erf_layers``.)

Gradients never touch parameter ``.grad`` (``torch.autograd.grad`` on the input only), the computation
leaves ``torch.inference_mode`` when called inside it (Lightning validation), runs its own forward pass on
fresh input tensors and keeps no graph afterwards.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

FLAG = "--callbacks.erf_layers"
RESNET_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4")
NUM_DEFAULT_LAYERS = 4


class _Captured(Exception):
    """Raised by the forward hook once the layer's output is captured: the rest of the network is not run."""


def _first_tensor(output) -> Tensor:
    """A module's output as one tensor (dict → 'out' or the first value; tuple/list → the first element)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        output = output["out"] if "out" in output else next(iter(output.values()))
        return _first_tensor(output)
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    raise TypeError(f"cannot take a receptive field of a layer returning {type(output).__name__}")


def _token_grid(model: nn.Module, input_hw: tuple[int, int], num_tokens: int,
                prefix_tokens: Optional[int], grid: Optional[tuple[int, int]]) -> tuple[int, tuple[int, int]]:
    """(number of prefix tokens, (h, w) patch grid) of a (B, N, D) token sequence."""
    if prefix_tokens is None:
        prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
    if grid is None:
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size") and getattr(model, "dynamic_img_size", False):
            grid = tuple(patch_embed.dynamic_feat_size(input_hw))
        elif patch_embed is not None and getattr(patch_embed, "patch_size", None) is not None:
            p = patch_embed.patch_size
            ph, pw = (p, p) if isinstance(p, int) else p
            grid = (input_hw[0] // ph, input_hw[1] // pw)
        else:  # no patch embedding to ask: a square grid of the non-prefix tokens
            side = math.isqrt(num_tokens - prefix_tokens)
            grid = (side, side)
    if grid[0] * grid[1] != num_tokens - prefix_tokens:
        raise ValueError(f"layer output has {num_tokens} tokens, which is not {prefix_tokens} prefix tokens plus a "
                         f"{grid[0]}×{grid[1]} patch grid; pass prefix_tokens= and grid= explicitly")
    return prefix_tokens, grid


def _centre_unit(model: nn.Module, layer: nn.Module, out: Tensor, input_hw: tuple[int, int],
                 prefix_tokens: Optional[int], grid: Optional[tuple[int, int]]) -> Tensor:
    """The centre unit of a layer output summed over channels (and the batch): a scalar."""
    if out.ndim == 4:
        if "NHWC" in str(getattr(layer, "output_fmt", "")):  # timm PatchEmbed with dynamic_img_size
            out = out.permute(0, 3, 1, 2)
        h, w = out.shape[-2:]
        return out[:, :, h // 2, w // 2].sum()
    if out.ndim == 3:
        prefix, (h, w) = _token_grid(model, input_hw, out.shape[1], prefix_tokens, grid)
        return out[:, prefix + (h // 2) * w + w // 2, :].sum()
    raise ValueError(f"layer output of shape {tuple(out.shape)} has no spatial centre: expected (B, C, h, w) "
                     "feature maps or (B, N, D) tokens")


def effective_receptive_field(model: nn.Module, images: Tensor, layer: Union[nn.Module, str], *,
                              prefix_tokens: Optional[int] = None,
                              grid: Optional[tuple[int, int]] = None, chunk_size: int = 0) -> Tensor:
    """The effective receptive field of the centre unit of ``layer``: a (H, W) float32 map, peak = 1.

    ``model(images)`` is run on a fresh copy of ``images`` (B, C, H, W) that requires grad; a forward hook
    on ``layer`` (a module inside ``model``, or its name for ``model.get_submodule``) captures its output
    and stops the forward pass there. The centre unit is
    * (B, C, h, w) feature maps: position (h // 2, w // 2), summed over the C channels;
    * (B, N, D) ViT tokens: the centre *patch* token (index ``prefix + (h // 2) * w + w // 2``, prefix tokens
      = ``model.num_prefix_tokens``, grid (h, w) from ``model.patch_embed`` and the input size, or
      ``prefix_tokens=`` / ``grid=``), summed over the D channels.
    The map is ``|∂ unit / ∂ input|`` averaged over images and input channels, divided by its maximum so
    the peak is 1 (an all-zero gradient stays all zeros). Summing the unit over the batch gives each
    image's own gradient only when images do not interact: call it with the model in eval mode (BatchNorm
    on running statistics), as :class:`~callbacks.receptive_field.ReceptiveFieldCallback` does.

    Parameter ``.grad`` is never touched, ``torch.inference_mode`` is left for the computation, no graph
    is kept. The map is returned on the images' device. ``chunk_size`` > 0 runs the images that many at a
    time (same map, bounded memory).
    """
    if isinstance(layer, str):
        layer = model.get_submodule(layer)
    if 0 < chunk_size < images.shape[0]:
        total = torch.zeros(images.shape[-2:], device=images.device)
        for chunk in images.split(chunk_size):
            total += _gradient_magnitude(model, chunk, layer, prefix_tokens, grid).sum(dim=(0, 1))
        erf = total / (images.shape[0] * images.shape[1])
    else:
        erf = _gradient_magnitude(model, images, layer, prefix_tokens, grid).mean(dim=(0, 1))
    peak = erf.max()
    return erf / peak if peak > 0 else erf


def _gradient_magnitude(model: nn.Module, images: Tensor, layer: nn.Module, prefix_tokens: Optional[int],
                        grid: Optional[tuple[int, int]]) -> Tensor:
    """|∂ centre unit / ∂ images|, (B, C, H, W) float32 (zeros when the unit does not depend on the images)."""
    captured: list[Tensor] = []

    def hook(module, args, output):
        captured.append(_first_tensor(output))
        raise _Captured

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else images.dtype
    handle = layer.register_forward_hook(hook)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = images.detach().clone().to(dtype=dtype).requires_grad_(True)  # clone: a normal tensor, not an inference one
            try:
                model(x)
            except _Captured:
                pass
            if not captured:
                raise RuntimeError(f"layer {type(layer).__name__} was not called by {type(model).__name__}.forward: "
                                   "is it a module of this model?")
            unit = _centre_unit(model, layer, captured[0], tuple(x.shape[-2:]), prefix_tokens, grid)
            if not unit.requires_grad:
                raise RuntimeError("the layer output does not depend on the input with gradients "
                                   "(computed under torch.no_grad()?)")
            (grad,) = torch.autograd.grad(unit, x, allow_unused=True)
    finally:
        handle.remove()
        captured.clear()
    if grad is None:
        return torch.zeros(images.shape, device=images.device)
    return grad.detach().float().abs()


def centre_patch_box(model: nn.Module, input_hw: tuple[int, int]) -> Optional[tuple[int, int, int, int]]:
    """(top, bottom, left, right) pixel bounds (exclusive ends) of the patch under a ViT's centre token — the
    token :func:`effective_receptive_field` differentiates — for an input of ``input_hw``; None for a model
    without a patch embedding (a CNN). Through the residual path every ViT block's centre token depends most
    on this patch, so its pixels dwarf the rest of the map."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        return None
    ph, pw = (size, size) if isinstance(size, int) else size
    if getattr(model, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
        h, w = patch_embed.dynamic_feat_size(input_hw)
    else:
        h, w = input_hw[0] // ph, input_hw[1] // pw
    top, left = (h // 2) * ph, (w // 2) * pw
    return top, top + ph, left, left + pw


# -- our backbones ---------------------------------------------------------------------------------------

def _is_vit(module) -> bool:
    return isinstance(module, nn.Module) and hasattr(module, "blocks") and hasattr(module, "patch_embed")


def _is_resnet_trunk(module) -> bool:
    return isinstance(module, nn.Module) and hasattr(module, "layer4")


def erf_model(obj: Optional[nn.Module]) -> nn.Module:
    """The module to differentiate: the timm VisionTransformer, or the ResNet trunk (a torchvision ResNet or
    DeepLab's IntermediateLayerGetter). ``obj``: one of our backbones, or the ViT / trunk itself (the callbacks
    pass the backbone of their LightningModule, ``callbacks.visual.backbone_of``)."""
    for module in (obj, getattr(obj, "vit", None), getattr(obj, "model", None)):
        if _is_vit(module) or _is_resnet_trunk(module):
            return module
    raise ValueError(f"{FLAG}: effective receptive fields need a ViT or ResNet backbone, not {type(obj).__name__}")


def vit_layer_indices(depth: int, spec: str) -> list[int]:
    """The block indices ``spec`` names in a ``depth``-block ViT (see :func:`resolve_layers`)."""
    if depth < 1:
        raise ValueError(f"{FLAG}: the ViT has no blocks")
    valid = f"valid: block indices 0..{depth - 1} (or -{depth}..-1 from the end), comma-separated, e.g. 0,{depth - 1}"
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:  # a spread over the network: first .. last block
        count = min(NUM_DEFAULT_LAYERS, depth)
        positions = [round(i * (depth - 1) / (count - 1)) for i in range(count)] if count > 1 else [depth - 1]
        return sorted(set(positions))
    indices: list[int] = []
    for part in parts:
        try:
            index = int(part)
        except ValueError:
            raise ValueError(f"{FLAG}={spec!r}: {part!r} is not a block index of this {depth}-block ViT; "
                             f"{valid}") from None
        if not -depth <= index < depth:
            raise ValueError(f"{FLAG}={spec!r}: block {index} is out of range for a {depth}-block ViT; {valid}")
        index %= depth
        if index not in indices:
            indices.append(index)
    return indices


def resnet_layer_names(spec: str) -> list[str]:
    """The ResNet layer names ``spec`` names (see :func:`resolve_layers`)."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        return ["layer1", "layer2", "layer3", "layer4"]
    names: list[str] = []
    for part in parts:
        if part not in RESNET_LAYERS:
            raise ValueError(f"{FLAG}={spec!r}: unknown ResNet layer {part!r}; valid: {', '.join(RESNET_LAYERS)} "
                             "(comma-separated, e.g. layer1,layer4)")
        if part not in names:
            names.append(part)
    return names


def resolve_layers(obj: nn.Module, spec: str) -> list[tuple[str, nn.Module]]:
    """``--callbacks.erf_layers`` → [(name, module)] inside :func:`erf_model` (names work with its
    ``get_submodule``).

    ViT: block indices "0,3,11" (negative from the end) → ``blocks.<i>``; empty → 4 evenly spaced blocks
    from the first to the last (fewer for shallower ViTs). ResNet: "conv1", "layer1".."layer4"; empty →
    layer1..layer4. Unknown names or out-of-range indices raise ValueError naming the flag and what is valid.
    """
    model = erf_model(obj)
    if _is_vit(model):
        return [(f"blocks.{i}", model.blocks[i]) for i in vit_layer_indices(len(model.blocks), spec)]
    return [(name, getattr(model, name)) for name in resnet_layer_names(spec)]
