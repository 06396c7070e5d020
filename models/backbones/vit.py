"""Vision Transformer backbones from timm (any timm ViT name, or one built from depth/width/patch size)."""
from __future__ import annotations

import contextlib
import functools
import logging

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from config.hparams import BackboneConfig
from models.backbones.registry import BACKBONES
from models.weights import WeightLoadingError, load_into, timm_published_weights

log = logging.getLogger(__name__)

# Architecture the generic name 'vit' starts from before depth/embed_dim/num_heads/patch_size overrides.
GENERIC_VIT = "vit_small_patch16_224"


@functools.lru_cache(maxsize=None)
def timm_vit_names() -> frozenset[str]:
    """Every timm ViT architecture name, with and without pretrained tags (e.g. '.dino')."""
    return frozenset(timm.list_models("vit_*")) | frozenset(timm.list_models("vit_*", pretrained=True))


def architecture_name(name: str) -> str:
    return GENERIC_VIT if name == "vit" else name


def arch_overrides(cfg: BackboneConfig) -> dict[str, int]:
    fields = {"depth": cfg.depth, "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads, "patch_size": cfg.patch_size}
    return {k: v for k, v in fields.items() if v}


@functools.lru_cache(maxsize=None)
def _named_architecture(name: str) -> dict[str, int]:
    # Built on the meta device: no memory, no weights, just the named model's hyperparameters.
    with torch.device("meta"):
        model = timm.create_model(timm.models.split_model_name_tag(name)[0], pretrained=False, num_classes=0)
    return {
        "depth": len(model.blocks),
        "embed_dim": model.embed_dim,
        "num_heads": model.blocks[0].attn.num_heads,
        "patch_size": model.patch_embed.patch_size[0],
    }


def vit_architecture(cfg: BackboneConfig) -> dict[str, int]:
    """The effective depth / embed_dim / num_heads / patch_size of 'vit' or a timm ViT name: the named model's,
    then the overrides (``models.backbones.resolve_architecture`` answers for every ViT-shaped backbone)."""
    return {**_named_architecture(architecture_name(cfg.name)), **arch_overrides(cfg)}


class ViTBackbone(nn.Module):
    """A timm VisionTransformer returning one embedding per image (CLS token or mean patch token).

    Fused attention (SDPA) stays on: callbacks that need attention probabilities compute them themselves.
    """

    batch_coupled = False  # no BatchNorm: both views can share one forward pass

    def __init__(self, vit: VisionTransformer, global_pool: str = "token"):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.vit = vit
        self.global_pool = global_pool
        self.num_features = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]

    def pool(self, tokens: Tensor) -> Tensor:
        if self.global_pool == "token":
            return tokens[:, 0]
        return tokens[:, self.vit.num_prefix_tokens:].mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.vit.forward_features(x))

    def forward_with_patches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The image embedding (B, D) and the final patch-token grid (B, D, H/p, W/p) of one forward pass."""
        tokens = self.vit.forward_features(x)
        rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = tokens[:, self.vit.num_prefix_tokens:].unflatten(1, (rows, cols)).permute(0, 3, 1, 2)
        return self.pool(tokens), patches


def load_vit_weights(vit: VisionTransformer, path: str, strict: bool) -> None:
    def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
        weight = state.get("patch_embed.proj.weight")
        expected = vit.patch_embed.proj.weight.shape
        # timm would silently resample a patch-16 embedding into a patch-8 model: refuse instead.
        if weight is not None and weight.ndim == 4 and tuple(weight.shape[-2:]) != tuple(expected[-2:]):
            raise WeightLoadingError(
                f"--backbone.weights: {path}: made for patch size {weight.shape[-1]}, but backbone patch size is {expected[-1]} "
                f"(set --backbone.patch_size={weight.shape[-1]} or pick the matching backbone.name)"
            )
        return checkpoint_filter_fn(state, vit)  # resizes pos_embed to this model's grid

    # Our checkpoints: Barlow Twins (backbone.vit.*) and segmentation (model.backbone.vit.*).
    load_into(vit, path, strict=strict, convert=convert, prefixes=("model.backbone.vit.", "backbone.vit."))


def build_vit(cfg: BackboneConfig, img_size: int) -> ViTBackbone:
    name = architecture_name(cfg.name)
    tag = timm.models.split_model_name_tag(name)[1]
    if tag and not cfg.pretrained and not cfg.weights:
        log.warning("backbone %s names published weights (.%s) but backbone.pretrained is false: the model is "
                    "randomly initialised (set --backbone.pretrained=true to download them)", name, tag)
    pretrained = cfg.pretrained and cfg.name != "vit"
    # Published weights come from the local cache when there, else after one quick connection attempt.
    with timm_published_weights(name) if pretrained else contextlib.nullcontext({}) as overlay:
        vit = timm.create_model(
            name,
            pretrained=pretrained,
            pretrained_cfg_overlay=overlay or None,
            num_classes=0,
            img_size=img_size,
            dynamic_img_size=True,  # other input sizes (multiples of the patch) interpolate the pos-embed
            drop_path_rate=cfg.drop_path_rate,
            **arch_overrides(cfg),
        )
    if cfg.weights:
        load_vit_weights(vit, cfg.weights, cfg.strict_weights)
    return ViTBackbone(vit, cfg.global_pool)


BACKBONES.register("vit", kind="vit", attention=True)(build_vit)
