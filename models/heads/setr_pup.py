"""SETR-PUP head (Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence
Perspective with Transformers", CVPR 2021): progressive upsampling of the last block's patch tokens.

log2(patch_size) stages, each 3×3 conv + BatchNorm + ReLU + ×2 bilinear upsampling (the first conv maps
in_dim → hidden_dim, the others hidden_dim → hidden_dim), then a 1×1 classifier conv: logits at
h·patch × w·patch, the input resolution. 4 stages for /16 as in the paper, 3 for /8, 5 for /32.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from models.heads.registry import HEADS, check_single_level, classifier, conv_norm_relu, single_feature


def num_stages(patch_size: int) -> int:
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"setr_pup upsamples in ×2 stages: the patch size must be a power of 2 ≥ 2, "
                         f"got {patch_size}")
    return patch_size.bit_length() - 1


class SETRPUPHead(nn.Module):
    num_levels = 1

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int, patch_size: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * num_stages(patch_size)
        self.stages = nn.Sequential(*(
            nn.Sequential(conv_norm_relu(d_in, d_out, 3),
                          nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            for d_in, d_out in zip(dims[:-1], dims[1:])
        ))
        self.classifier = classifier(hidden_dim, num_classes)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.stages(single_feature(features)))


@HEADS.register("setr_pup")
def build(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1) -> nn.Module:
    check_single_level("setr_pup", num_levels)
    return SETRPUPHead(in_dim, num_classes, cfg.hidden_dim, patch_size)
