"""Segmentation models: a backbone + a head, returning logits at the input resolution.

* ViT backbones feed the patch-token grids of chosen blocks (CLS dropped) to a head from
  ``models.heads.HEADS`` (linear, setr_naive, setr_pup, setr_mla, setr_pytorch_naive, setr_pytorch_pup,
  attn_fusion); SETR's auxiliary heads' logits come back as ``out["aux"]`` (a list) in training mode.
  A head that declares ``needs_attention`` (attn_fusion) also gets those blocks' softmax attention,
  recorded during the same backbone pass (one pass per forward; the other heads pay nothing for it).
* ResNet-50 is used inside torchvision's DeepLabV3 (dilated, output stride 8), as in the report's Table 1.

A frozen backbone runs in eval mode under ``torch.no_grad()``: no graph, no gradients, no BatchNorm
statistics updates; only the head trains.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from config.hparams import Hparams
from models.backbones import build_backbone, is_vit
from models.backbones.vit import ViTBackbone
from models.heads import HEADS, head_levels
from models.backbones.resnet import imagenet_weights_download
from models.weights import load_into, torchvision_weights
from analysis.attention import BlockAttention, block_attention, recorded_attention_inputs

log = logging.getLogger(__name__)

DEEPLAB_HEAD = "deeplabv3"

HEAD_WEIGHTS = "--segmentation.head_weights"
HEAD_HINT = "check --segmentation.head / hidden_dim / num_classes / mla_blocks and the backbone's embed_dim / patch_size"
# What --segmentation.pretrained_head can do without network instead: torchvision's file is a DeepLabV3 state
# dict, whose classifier.* / aux_classifier.* are the head and backbone.* the ResNet-50.
COCO_OFFLINE = ("download that file elsewhere and pass it as both --segmentation.head_weights PATH and --backbone.weights "
                "PATH (with --segmentation.aux_loss true for its auxiliary head) instead of "
                "--segmentation.pretrained_head, or copy it to {cached}")


class Segmenter(nn.Module):
    """Common behaviour: freezing, and the split into backbone and head parameters."""

    backbone: nn.Module

    def __init__(self, freeze_backbone: bool):
        super().__init__()
        self.freeze_backbone = freeze_backbone

    def freeze(self) -> None:
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "Segmenter":
        super().train(mode)
        if self.freeze_backbone:  # a frozen backbone stays in eval mode whatever Lightning asks
            self.backbone.eval()
        return self

    def head_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _features_context(self):
        return torch.no_grad() if self.freeze_backbone else torch.enable_grad()


class ViTSegmenter(Segmenter):
    def __init__(self, backbone: ViTBackbone, head: nn.Module, levels: list[int], freeze_backbone: bool = True):
        super().__init__(freeze_backbone)
        self.backbone, self.head, self.levels = backbone, head, levels
        self.needs_attention = bool(getattr(head, "needs_attention", False))
        # SETR's heads normalise the raw block outputs with LayerNorms of their own (backbone_norm = False).
        self.backbone_norm = bool(getattr(head, "backbone_norm", True))
        self.freeze()

    def features(self, x: Tensor) -> list[Tensor]:
        """Patch-token grids (B, D, H/p, W/p) of the chosen blocks, after the final norm unless the head
        normalises them itself."""
        with self._features_context():
            return self.backbone.vit.forward_intermediates(
                x, indices=self.levels, norm=self.backbone_norm, stop_early=True, output_fmt="NCHW",
                intermediates_only=True
            )

    def features_and_attention(self, x: Tensor) -> tuple[list[Tensor], list[BlockAttention]]:
        """:meth:`features` plus the softmax attention of the same blocks, from one backbone pass (the
        attention inputs are recorded on the way, the probabilities recomputed from the block weights:
        fused attention stays on). Without gradients for a frozen backbone, like the features."""
        vit = self.backbone.vit
        with self._features_context(), recorded_attention_inputs(vit, self.levels) as inputs:
            feats = self.features(x)
            grid = tuple(feats[0].shape[-2:])
            attentions = [block_attention(vit, i, inputs[i], grid) for i in self.levels]
        return feats, attentions

    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        if self.needs_attention:
            out = self.head(*self.features_and_attention(x))
        else:
            out = self.head(self.features(x))
        logits, aux = out if isinstance(out, tuple) else (out, [])  # SETR's auxiliary heads (training only)

        def to_input_size(t: Tensor) -> Tensor:
            if t.shape[-2:] == x.shape[-2:]:
                return t
            return F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)

        result: dict[str, Tensor | list[Tensor]] = {"out": to_input_size(logits)}
        if aux:
            result["aux"] = [to_input_size(t) for t in aux]
        return result

    def head_modules(self) -> list[nn.Module]:
        return [self.head]


class DeepLabV3Segmenter(Segmenter):
    """torchvision's DeepLabV3-ResNet-50; module names match torchvision's files (backbone., classifier.,
    aux_classifier.) so its COCO weights and our ResNet-50 checkpoints load directly."""

    def __init__(self, model: torchvision.models.segmentation.DeepLabV3, freeze_backbone: bool = True):
        super().__init__(freeze_backbone)
        self.backbone = model.backbone
        self.classifier = model.classifier
        self.aux_classifier = model.aux_classifier
        self.freeze()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._features_context():
            features = self.backbone(x)
        out = {"out": F.interpolate(self.classifier(features["out"]), size=size, mode="bilinear", align_corners=False)}
        if self.aux_classifier is not None:
            out["aux"] = F.interpolate(self.aux_classifier(features["aux"]), size=size, mode="bilinear",
                                       align_corners=False)
        return out

    def head_modules(self) -> list[nn.Module]:
        return [m for m in (self.classifier, self.aux_classifier) if m is not None]


def head_fits_backbone(head: str, backbone: str) -> Optional[str]:
    """Why ``head`` cannot sit on ``backbone`` (None when it can)."""
    if head == DEEPLAB_HEAD and is_vit(backbone):
        return f"--segmentation.head={head} needs --backbone.name=resnet50 (DeepLabV3-ResNet-50); for ViTs use " \
               f"{', '.join(HEADS.names())}"
    if head != DEEPLAB_HEAD and not is_vit(backbone):
        return f"--segmentation.head={head} needs a ViT backbone (it reads patch tokens); for {backbone} use {DEEPLAB_HEAD}"
    return None


def segmentation_head_names() -> list[str]:
    return HEADS.names() + [DEEPLAB_HEAD]


def _heads_saying(attribute: str) -> list[str]:
    """The ViT heads whose registry entry sets ``attribute`` (in registration order)."""
    return [name for name, factory in HEADS.items() if getattr(factory, attribute, False)]


def head_settings_problem(cfg: Hparams) -> Optional[str]:
    """What is wrong with the ``--segmentation`` head settings of ``cfg`` by what the chosen head's registry
    entry says about itself (its own ``check_config``, whether it has auxiliary heads or classifier dropout), or
    None. DeepLabV3 (not a registry entry: a whole torchvision model) has an auxiliary head, no dropout."""
    s = cfg.segmentation
    factory = HEADS.get(s.head) if s.head in HEADS else None
    check = getattr(factory, "check_config", None)
    problem = check(cfg) if check is not None else None
    if problem:
        return problem
    if s.pretrained_head and s.head != DEEPLAB_HEAD:
        return f"--segmentation.pretrained_head applies to --segmentation.head={DEEPLAB_HEAD} only"
    aux_heads = [DEEPLAB_HEAD] + _heads_saying("aux_heads")
    if s.aux_loss and s.head not in aux_heads:
        return (f"--segmentation.aux_loss applies to --segmentation.head={', '.join(aux_heads)} only "
                f"(their auxiliary heads), not {s.head}")
    if s.aux_blocks.strip() and not (s.head == "setr_pup" and s.aux_loss):
        return ("--segmentation.aux_blocks places setr_pup's auxiliary heads: it needs "
                "--segmentation.head=setr_pup and --segmentation.aux_loss=true")
    dropout_heads = _heads_saying("classifier_dropout")
    if s.classifier_dropout > 0 and s.head not in dropout_heads:
        return (f"--segmentation.classifier_dropout applies to --segmentation.head={', '.join(dropout_heads)} "
                f"only, not {s.head}")
    return None


def build_deeplabv3(cfg: Hparams) -> DeepLabV3Segmenter:
    from torchvision.models import ResNet50_Weights
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, deeplabv3_resnet50

    seg = cfg.segmentation
    # Published weights come from torch.hub's cache when there, else after one quick connection attempt;
    # without network each fails in one line naming its flag and the offline alternative.
    if seg.pretrained_head:  # the whole COCO-trained model (its 21 classes are VOC's)
        coco = DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1
        with torchvision_weights(coco, "--segmentation.pretrained_head",
                                 "torchvision's COCO DeepLabV3-ResNet-50 weights", COCO_OFFLINE):
            model = deeplabv3_resnet50(weights=coco, aux_loss=True)
        if not seg.aux_loss:
            model.aux_classifier = None
    else:
        backbone_weights = ResNet50_Weights.IMAGENET1K_V1 if cfg.backbone.pretrained else None
        with imagenet_weights_download() if backbone_weights else contextlib.nullcontext():
            model = deeplabv3_resnet50(weights=None, weights_backbone=backbone_weights,
                                       num_classes=seg.num_classes, aux_loss=seg.aux_loss)
    if seg.pretrained_head and cfg.backbone.pretrained:  # Table 1: COCO head, ImageNet-supervised backbone
        with imagenet_weights_download():
            imagenet = torchvision.models.resnet50(weights=ResNet50_Weights.IMAGENET1K_V1).state_dict()
        model.backbone.load_state_dict({k: v for k, v in imagenet.items() if not k.startswith("fc.")})
    if seg.head_weights:
        heads = nn.ModuleDict({"classifier": model.classifier})
        if model.aux_classifier is not None:
            heads["aux_classifier"] = model.aux_classifier
        # Without aux_loss the model has no auxiliary head: a file's aux_classifier.* is left out, as
        # pretrained_head does, so torchvision's COCO file loads cleanly either way.
        wanted = tuple(f"{name}." for name in heads)
        load_into(heads, seg.head_weights, strict=cfg.backbone.strict_weights, prefixes=("model.", ""),
                  select=lambda key: key.startswith(wanted), flag=HEAD_WEIGHTS, target_name="segmentation head",
                  hint=HEAD_HINT)
    if cfg.backbone.weights:
        load_into(model.backbone, cfg.backbone.weights, strict=cfg.backbone.strict_weights,
                  prefixes=("model.backbone.", "backbone.model.", "backbone."))
    return DeepLabV3Segmenter(model, seg.freeze_backbone)


def build_vit_segmenter(cfg: Hparams) -> ViTSegmenter:
    seg = cfg.segmentation
    backbone = build_backbone(cfg.backbone, cfg.data.img_size)
    levels = head_levels(seg.head, len(backbone.vit.blocks), seg)
    factory = HEADS.get(seg.head)
    extra = {}
    if getattr(factory, "needs_attention", False):
        if getattr(backbone.vit, "cls_token", None) is None:
            raise ValueError(f"--segmentation.head={seg.head} reads the CLS token's attention; {cfg.backbone.name} "
                             "has no class token")
        extra["num_heads"] = backbone.vit.blocks[levels[-1]].attn.num_heads
    head = factory(backbone.num_features, seg.num_classes, backbone.patch_size, seg, num_levels=len(levels), **extra)
    if seg.head_weights:
        load_into(head, seg.head_weights, strict=cfg.backbone.strict_weights, prefixes=("model.head.", "head."),
                  flag=HEAD_WEIGHTS, target_name="segmentation head", hint=HEAD_HINT)
    return ViTSegmenter(backbone, head, levels, seg.freeze_backbone)


def build_segmenter(cfg: Hparams) -> Segmenter:
    problem = head_fits_backbone(cfg.segmentation.head, cfg.backbone.name)
    if problem:
        raise ValueError(problem)
    if cfg.segmentation.head == DEEPLAB_HEAD:
        return build_deeplabv3(cfg)
    return build_vit_segmenter(cfg)
