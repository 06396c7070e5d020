"""torchvision ResNet-50 backbone (global average-pooled 2048-d features)."""
from __future__ import annotations

import torch
import torchvision
import torch.nn.functional as F
from torch import Tensor, nn

from config.hparams import BackboneConfig
from models.backbones.registry import BACKBONES
from models.weights import load_into, torchvision_weights

# What --backbone.pretrained can do without network instead (torchvision's file is a plain state dict).
IMAGENET_OFFLINE = ("download that file elsewhere and pass --backbone.weights PATH instead of --backbone.pretrained, "
                    "or copy it to {cached}")


def imagenet_weights_download():
    """Around torchvision code that loads the ImageNet ResNet-50 weights (--backbone.pretrained): from torch.hub's
    cache, else downloaded after one quick connection attempt; failures are one line (models.weights)."""
    return torchvision_weights(torchvision.models.ResNet50_Weights.IMAGENET1K_V1, "--backbone.pretrained",
                               "torchvision's ImageNet ResNet-50 weights", IMAGENET_OFFLINE)


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics (never updated) while its affine
    weight and bias still train: the output of an image does not depend on the rest of the batch, so
    chunked (micro-batched) and multi-device training equal single-batch training exactly. Meant for
    initialised backbones (ImageNet or Barlow Twins weights); from scratch it normalises nothing."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


NORM_LAYERS = {"batch": nn.BatchNorm2d, "frozen": FrozenStatsBatchNorm2d, "group": group_norm}


class ResNetBackbone(nn.Module):
    def __init__(self, model: torchvision.models.ResNet, norm: str = "batch"):
        super().__init__()
        model.fc = nn.Identity()
        self.model = model
        self.num_features = 2048
        # With BatchNorm each view gets its own forward pass, as in the official code (its statistics then
        # describe one view's batch); batch-independent norms let both views share one pass.
        self.batch_coupled = norm == "batch"

    def _apply(self, fn, recurse=True):
        # Channels-last weights and inputs on CUDA: cuDNN's fast NHWC convolutions, especially under bf16.
        module = super()._apply(fn, recurse)
        if next(self.model.parameters()).is_cuda:
            self.model.to(memory_format=torch.channels_last)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x)


@BACKBONES.register("resnet50", kind="cnn", attention=False)
def build_resnet50(cfg: BackboneConfig, img_size: int) -> ResNetBackbone:
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if cfg.pretrained else None
    if weights is not None and cfg.resnet_norm == "group":
        raise ValueError("backbone.resnet_norm=group cannot use the BatchNorm ImageNet weights (backbone.pretrained)")
    model = torchvision.models.resnet50(norm_layer=NORM_LAYERS[cfg.resnet_norm])
    if weights is not None:
        with imagenet_weights_download():
            model.load_state_dict(weights.get_state_dict(progress=True))
    backbone = ResNetBackbone(model, cfg.resnet_norm)
    if cfg.weights:
        # Load after fc is replaced: the backbone has no fc, so a file's fc.* tensors are dropped as a
        # classifier head and a file without them (the official Barlow Twins ResNet-50) has nothing missing.
        load_into(backbone.model, cfg.weights, strict=cfg.strict_weights,
                  prefixes=("model.backbone.", "backbone.model."))
    return backbone
