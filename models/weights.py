"""Loading local weight files into a backbone, loudly.

Accepts a plain state dict (.pth/.pt/.bin, timm/torchvision/DINO/official Barlow Twins files), a
.safetensors file, or a Lightning checkpoint of our own runs (``runs/<run>/checkpoints/last.ckpt``).
The key prefix (``backbone.vit.``, ``module.``, ...) is found by matching against the target module's
own keys, and missing / unexpected keys are reported rather than silently ignored.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

# Keys of classification heads that a backbone legitimately drops.
_HEAD_PREFIXES = ("fc.", "head.", "head_dist.", "classifier.")


class WeightLoadingError(RuntimeError):
    """A weight file cannot be used for this backbone; the message names the file and the problem."""


@dataclass
class LoadReport:
    path: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped_head: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.path}"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing (kept at init): {_preview(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (ignored): {_preview(self.unexpected)}")
        if self.dropped_head:
            parts.append(f"{len(self.dropped_head)} classifier-head tensors dropped")
        return "; ".join(parts)


def _preview(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", … (+{len(keys) - n})" if len(keys) > n else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightLoadingError(f"weight file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means "not a weight file we can read"
        raise WeightLoadingError(f"cannot read weight file {path}: {err}") from None
    for key in ("state_dict", "model", "module"):  # Lightning ckpt, DeiT/MAE-style, DDP wrappers
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightLoadingError(f"{path} does not hold a state dict of tensors")
    return obj


def strip_common_prefix(state: dict[str, torch.Tensor], target_keys: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Find the prefix that maps most file keys onto target keys and remove it from the keys that have it."""
    votes: Counter[str] = Counter()
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in target_keys:
                votes[".".join(parts[:i]) + ("." if i else "")] += 1
                break
    if not votes:
        return state, ""
    prefix = votes.most_common(1)[0][0]
    if not prefix:
        return state, ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix


def choose_prefix(state: dict[str, torch.Tensor], target_keys: set[str],
                  prefixes: Sequence[str]) -> tuple[dict[str, torch.Tensor], str]:
    """The first of ``prefixes`` (known layouts, e.g. our checkpoints' 'model.backbone.vit.') under which
    some file key matches the target; otherwise the prefix found by :func:`strip_common_prefix`."""
    for prefix in prefixes:
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if any(k in target_keys for k in stripped):
            return stripped, prefix
    return strip_common_prefix(state, target_keys)


def load_into(
    module: nn.Module,
    path: str | Path,
    strict: bool = False,
    convert: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None,
    prefixes: Sequence[str] = (),
    select: Optional[Callable[[str], bool]] = None,
) -> LoadReport:
    """Load ``path`` into ``module``. ``prefixes``: known key layouts to try first; ``select``: keep only
    the (prefix-stripped) keys it accepts; ``convert`` adapts the file to the module (pos-embed resizing)."""
    state = read_state_dict(path)
    target = module.state_dict()
    state, prefix = choose_prefix(state, set(target), prefixes)
    if select is not None:
        state = {k: v for k, v in state.items() if select(k)}
    if convert is not None:
        state = convert(state)
    dropped = [k for k in state if k not in target and k.startswith(_HEAD_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in dropped}
    matched = [k for k in state if k in target]
    if not matched:
        raise WeightLoadingError(
            f"{path}: none of its {len(state)} tensors match this backbone "
            f"(file keys look like {_preview(sorted(state), 3)}; backbone keys look like {_preview(sorted(target), 3)})"
        )
    for key in matched:
        if state[key].shape != target[key].shape:
            raise WeightLoadingError(
                f"{path}: tensor {key!r} has shape {tuple(state[key].shape)} but the backbone expects "
                f"{tuple(target[key].shape)} — the file was made for a different architecture "
                f"(check backbone.name / depth / embed_dim / patch_size / data.img_size)"
            )
    result = module.load_state_dict(state, strict=False)
    report = LoadReport(str(path), len(matched), list(result.missing_keys), list(result.unexpected_keys), dropped)
    if prefix:
        log.info("weights %s: stripped key prefix %r", path, prefix)
    if (report.missing or report.unexpected) and strict:
        raise WeightLoadingError(f"backbone.weights (strict): {report.summary()}")
    (log.warning if report.missing or report.unexpected else log.info)("backbone.weights: %s", report.summary())
    return report
