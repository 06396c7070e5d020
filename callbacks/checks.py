"""The callbacks group's own check of a config (``--callbacks.*`` against the backbone and task it runs with),
asked by ``config.validation`` before any data or model is touched: one line naming the flag, or None.

Each optional callback has its check here; :func:`check_config` runs them in order.
"""
from __future__ import annotations

from typing import Callable, Optional

from analysis.receptive_field import resnet_layer_names, vit_layer_indices
from callbacks.visual import parse_indices
from config.hparams import Hparams
from lightningmodules import TASKS
from models.backbones import backbone_kind, check_backbone_name, has_attention, is_vit, resolve_architecture
from utils.registry import UnknownNameError


def pretraining(cfg: Hparams) -> bool:
    """Whether ``cfg.task`` is a self-supervised pretraining task (its registry entry says so)."""
    return cfg.task in TASKS and TASKS.get(cfg.task).pretraining


def check_attention_blocks(cfg: Hparams) -> Optional[str]:
    c = cfg.callbacks
    try:
        blocks = parse_indices(c.attention_blocks, "--callbacks.attention_blocks")
    except ValueError as err:
        return str(err)
    if c.attention and blocks and is_vit(cfg.backbone.name):
        depth = resolve_architecture(cfg.backbone)["depth"]
        bad = [b for b in blocks if not -depth <= b < depth]
        if bad:
            return (f"--callbacks.attention_blocks: block(s) {bad} out of range for a {depth}-block ViT "
                    f"(valid: 0..{depth - 1}, or negative from the end)")
    return None


def check_emergence(cfg: Hparams) -> Optional[str]:
    c = cfg.callbacks
    if c.emergence and pretraining(cfg) and is_vit(cfg.backbone.name) and has_attention(cfg.backbone.name):
        patch = resolve_architecture(cfg.backbone)["patch_size"]
        if c.emergence_img_size % patch:
            return (f"--callbacks.emergence_img_size={c.emergence_img_size} is not a multiple of the patch "
                    f"size {patch}; e.g. {max(patch, c.emergence_img_size // patch * patch)}")
    return None


def check_online_probe(cfg: Hparams) -> Optional[str]:
    # Asked for explicitly (it is off by default), so a backbone it cannot probe is an error, not a warning.
    if cfg.callbacks.online_probe and pretraining(cfg) and not is_vit(cfg.backbone.name):
        return (f"--callbacks.online_probe needs a ViT backbone (it trains a linear head on patch "
                f"tokens); --backbone.name={cfg.backbone.name} is a CNN")
    return None


def check_erf_layers(cfg: Hparams) -> Optional[str]:
    """Why ``cfg.callbacks.erf_layers`` cannot work with ``cfg.backbone`` (a one-line message naming the
    flag), or None. Built from the config alone (a ViT's depth from its architecture, no weights). Only
    checked when ``cfg.callbacks.erf`` is on; a backbone name that is itself invalid is left to its own check."""
    if not cfg.callbacks.erf:
        return None
    try:
        check_backbone_name(cfg.backbone.name)
    except UnknownNameError:
        return None
    try:
        if is_vit(cfg.backbone.name):
            vit_layer_indices(resolve_architecture(cfg.backbone)["depth"], cfg.callbacks.erf_layers)
        elif backbone_kind(cfg.backbone.name) == "cnn":
            resnet_layer_names(cfg.callbacks.erf_layers)
    except ValueError as err:
        return str(err)
    return None


CHECKS: tuple[Callable[[Hparams], Optional[str]], ...] = (
    check_attention_blocks, check_emergence, check_online_probe, check_erf_layers,
)


def check_config(cfg: Hparams) -> Optional[str]:
    """The first problem any callback finds with ``cfg``, or None."""
    for check in CHECKS:
        problem = check(cfg)
        if problem:
            return problem
    return None
