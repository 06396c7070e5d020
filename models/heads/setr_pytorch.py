"""The SETR heads the report used: setr-pytorch's (github.com/gupta-abhay/setr-pytorch, ``setr/SETR.py``),
which the report "adapted" for its Table 2 (§5.3). They differ from SETR's official heads
(``setr_naive``, ``setr_pup``):

* ``setr_pytorch_naive`` (``SETR_Naive``): 1×1 conv in_dim → in_dim (hidden width = the embedding width,
  384 for ViT-S; SETR uses 256) + BatchNorm + ReLU → 1×1 conv → classes; upsampled ×patch bilinearly
  (by the caller). No LayerNorm of its own: the ViT's final norm is its input, as setr-pytorch's
  ``pre_head_ln``.
* ``setr_pytorch_pup`` (``SETR_PUP``): 1×1 convolutions only, in_dim → in_dim/4 → … → classes, each hidden one
  followed by ×2 bilinear upsampling, and no BatchNorm or ReLU anywhere: a *linear* map of the patch tokens
  (rank ≤ in_dim/4) followed by fixed interpolation — 66,933 parameters for ViT-S/16, fewer than the naive
  head's 156,693, which is how the report explains its lower mIoU (0.4297 vs 0.5861 for ViT-S/8).
  setr-pytorch hard-codes 4 upsampling stages (patch 16); here there are log2(patch_size) of them (3 for
  ViT-S/8: one 96 → 96 conv fewer, 57,621 parameters) so that the logits land at the input resolution.

Weights keep PyTorch's default initialisation, as setr-pytorch does; ``--segmentation.hidden_dim``,
``classifier_dropout`` and ``aux_loss`` do not apply (setr-pytorch has none of them).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from models.heads.registry import HEADS, check_single_level, single_feature
from models.heads.setr_pup import num_stages


class SETRPytorchNaiveHead(nn.Module):
    num_levels = 1

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, in_dim, 1)
        self.bn1 = nn.BatchNorm2d(in_dim)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(in_dim, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.conv2(self.act1(self.bn1(self.conv1(single_feature(features)))))


class SETRPytorchPUPHead(nn.Module):
    num_levels = 1

    def __init__(self, in_dim: int, num_classes: int, patch_size: int):
        super().__init__()
        width = in_dim // 4
        if width < 1:
            raise ValueError(f"setr_pytorch_pup narrows the embedding to a quarter: in_dim must be >= 4, got {in_dim}")
        layers: list[nn.Module] = []
        d_in = in_dim
        for _ in range(num_stages(patch_size)):
            layers += [nn.Conv2d(d_in, width, 1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            d_in = width
        layers.append(nn.Conv2d(width, num_classes, 1))
        self.decode = nn.Sequential(*layers)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.decode(single_feature(features))


@HEADS.register("setr_pytorch_naive")
def build_naive(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1) -> nn.Module:
    check_single_level("setr_pytorch_naive", num_levels)
    return SETRPytorchNaiveHead(in_dim, num_classes)


@HEADS.register("setr_pytorch_pup")
def build_pup(in_dim: int, num_classes: int, patch_size: int, cfg, num_levels: int = 1) -> nn.Module:
    check_single_level("setr_pytorch_pup", num_levels)
    return SETRPytorchPUPHead(in_dim, num_classes, patch_size)
