"""torchvision ResNet-50 backbone (global average-pooled 2048-d features)."""
from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from config.hparams import BackboneConfig
from models.backbones.registry import BACKBONES
from models.weights import load_into


class ResNetBackbone(nn.Module):
    batch_coupled = True  # BatchNorm: each view gets its own forward pass, as in the official code

    def __init__(self, model: torchvision.models.ResNet):
        super().__init__()
        model.fc = nn.Identity()
        self.model = model
        self.num_features = 2048

    def _apply(self, fn, recurse=True):
        # Channels-last weights and inputs on CUDA: cuDNN's fast NHWC convolutions, especially under bf16.
        module = super()._apply(fn, recurse)
        if next(self.model.parameters()).is_cuda:
            self.model.to(memory_format=torch.channels_last)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x)


@BACKBONES.register("resnet50")
def build_resnet50(cfg: BackboneConfig, img_size: int) -> ResNetBackbone:
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if cfg.pretrained else None
    backbone = ResNetBackbone(torchvision.models.resnet50(weights=weights))
    if cfg.weights:
        # Load after fc is replaced: the backbone has no fc, so a file's fc.* tensors are dropped as a
        # classifier head and a file without them (the official Barlow Twins ResNet-50) has nothing missing.
        load_into(backbone.model, cfg.weights, strict=cfg.strict_weights,
                  prefixes=("model.backbone.", "backbone.model."))
    return backbone
