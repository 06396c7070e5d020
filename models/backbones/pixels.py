"""Raw pixel patches as a "backbone": the floor any learned feature must beat.

``backbone.name=pixels`` gives, for each patch of ``backbone.patch_size`` pixels, its normalised RGB values
flattened into a 3·p² vector — what a per-patch linear classifier on pixels sees. It is a timm
VisionTransformer (one block, never used) whose feature methods are replaced, so every ViT head and
callback accepts it; its patch tokens are exactly ``pixel_unshuffle`` of the input, and its "CLS token" is
their mean. It has no trainable parameters that influence its output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from config.hparams import BackboneConfig
from models.backbones.registry import BACKBONES
from models.backbones.vit import ViTBackbone

DEFAULT_PATCH = 8


class PixelPatchViT(VisionTransformer):
    has_attention = False  # attention pictures and metrics skip it (callbacks.visual.vit_in)

    def patch_tokens(self, x: Tensor) -> Tensor:
        """(B, 3·p², H/p, W/p): each patch's pixels, channel-major (pixel_unshuffle's order)."""
        return F.pixel_unshuffle(x, self.patch_embed.patch_size[0])

    def forward_features(self, x: Tensor) -> Tensor:
        grid = self.patch_tokens(x).flatten(2).transpose(1, 2)  # (B, N, 3p²)
        return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)

    def forward_intermediates(self, x: Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, **kwargs):
        count = 1 if indices is None else (len(indices) if isinstance(indices, (list, tuple)) else int(indices))
        grid = self.patch_tokens(x)
        if output_fmt == "NLC":
            grid = grid.flatten(2).transpose(1, 2)
        intermediates = [grid] * count
        return intermediates if intermediates_only else (self.forward_features(x), intermediates)


def pixel_architecture(patch_size: int) -> dict[str, int]:
    p = patch_size or DEFAULT_PATCH
    return {"depth": 1, "embed_dim": 3 * p * p, "num_heads": 1, "patch_size": p}


@BACKBONES.register("pixels", kind="vit", attention=False, architecture=lambda cfg: pixel_architecture(cfg.patch_size))
def build_pixels(cfg: BackboneConfig, img_size: int):
    arch = pixel_architecture(cfg.patch_size)
    vit = PixelPatchViT(img_size=img_size, num_classes=0, dynamic_img_size=True, **arch)
    vit.requires_grad_(False)
    return ViTBackbone(vit, "token")
