"""Loading weight files into a module, loudly, and fetching published weights without hanging offline.

Local files: a plain state dict (.pth/.pt/.bin, timm/torchvision/DINO/official Barlow Twins files), a
.safetensors file, or a Lightning checkpoint of our own runs (``runs/<run>/checkpoints/last.ckpt``). The
format is recognised from the file's first bytes, not its name. The key prefix (``backbone.vit.``,
``module.``, ...) is found by matching against the target module's own keys (a DINO run's checkpoint gives
its teacher backbone, ``teacher_backbone.*``, as DINO evaluates), and missing / unexpected keys
are reported rather than silently ignored. Every failure is one :class:`WeightLoadingError` line naming the
flag and the file (an empty, truncated or foreign file says which).

Published weights (timm's hub, torchvision): a file already in the library's cache is loaded with no
network; otherwise one quick connection attempt (``utils.downloads``) comes before the library's own
download, so that a machine without network fails in seconds with the offline alternative, not after the
libraries' retry loops.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence
from urllib.parse import urlsplit

import torch
from torch import nn

from utils.downloads import connection_problem, one_line

log = logging.getLogger(__name__)

# Keys of classification heads that a backbone legitimately drops.
_HEAD_PREFIXES = ("fc.", "head.", "head_dist.", "classifier.")

FORMATS = "a PyTorch state dict or checkpoint (torch.save: .pth/.pt/.ckpt) or a .safetensors file"
BACKBONE_HINT = "check --backbone.name / depth / embed_dim / patch_size / data.img_size"
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


class WeightLoadingError(RuntimeError):
    """Weights cannot be used; the one-line message names the flag, the file or URL, and the problem."""


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


# ------------------------------------------------------------------------------------------ local files
def _safetensors_header(head: bytes) -> Optional[int]:
    """The JSON header length when ``head`` (the first 9 bytes) starts a safetensors file, else None."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    length = int.from_bytes(head[:8], "little")
    return length if 2 <= length <= SAFETENSORS_MAX_HEADER else None


def file_format(path: Path) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save), 'safetensors', or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if _safetensors_header(head) is not None:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def _describe_bytes(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights (fetch them with git lfs pull)"
    text = head.decode("utf-8", errors="replace")
    if head and all(c.isprintable() or c in "\n\r\t" for c in text):
        return f"it is a text file starting with {one_line(text, 40)!r}"
    return f"it starts with bytes {head[:8].hex(' ')}"


def _safetensors_damage(path: Path, size: int) -> Optional[str]:
    with open(path, "rb") as f:
        length = _safetensors_header(f.read(9)) or 0
        f.seek(8)
        header = f.read(length)
    if 8 + length > size:
        return f"its header ends early ({size} of at least {8 + length} bytes): the file is truncated"
    try:
        entries = json.loads(header)
        data_end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        return "its header is not valid safetensors JSON (damaged)"
    if 8 + length + data_end > size:
        return f"it is {size} bytes but its header describes {8 + length + data_end}: the file is truncated"
    return None


def _torch_load_reason(err: Exception) -> str:
    text = str(err)
    refused = (re.search(r"Unsupported global: GLOBAL \S+", text)
               or re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", text, re.S))
    if refused:
        detail = refused.group(1) if refused.groups() else refused.group(0)
        return (f"torch.load(weights_only=True) refuses it ({one_line(detail, 120)}): it is not a torch.save file, "
                f"or one holding Python objects besides tensors; save only the state dict with torch.save and pass that")
    return one_line(err, 200) if text else type(err).__name__


def _diagnose(path: Path, kind: str, size: int, err: Exception) -> str:
    """Why ``path`` could not be read, as one line."""
    if kind == "zip" and not zipfile.is_zipfile(path):
        return (f"it is a PyTorch zip archive that ends early ({size} bytes): the file is truncated "
                f"(an interrupted download or copy?)")
    if kind == "safetensors":
        return _safetensors_damage(path, size) or f"safetensors cannot read it: {one_line(err, 200)}"
    if kind == "pickle" and (isinstance(err, (EOFError, OSError)) or re.search("truncated|EOF", str(err))):
        return f"it is a legacy PyTorch pickle that ends early ({size} bytes): the file is truncated"
    return _torch_load_reason(err)


def _load(path: Path, kind: str, mmap: bool = False) -> object:
    if kind == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if mmap:  # a readability check: the header and the tensor names, no data copied
            with safe_open(str(path), "pt") as f:
                return dict.fromkeys(f.keys())
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")


def read_weight_file(path: str | Path, flag: str = "--backbone.weights", mmap: bool = False) -> object:
    """Whatever ``path`` holds (a state dict, a checkpoint dict), or a one-line WeightLoadingError naming
    ``flag`` and the file: missing, empty, truncated, not a weight file, or refused by torch.load."""
    path = Path(path)
    if not path.is_file():
        raise WeightLoadingError(f"{flag}: file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise WeightLoadingError(f"{flag}: {path} is empty (0 bytes); expected {FORMATS}")
    kind = file_format(path)
    if kind == "unknown":
        raise WeightLoadingError(f"{flag}: {path} is not a weight file: {_describe_bytes(path)}; expected {FORMATS}")
    with warnings.catch_warnings(record=True) as caught:  # torch.load's warnings about a file it then refuses
        warnings.simplefilter("always")
        try:
            obj = _load(path, kind, mmap)
        except Exception as err:  # noqa: BLE001 - any failure here means "not a weight file we can read"
            raise WeightLoadingError(f"{flag}: cannot read {path}: {_diagnose(path, kind, size, err)}") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return obj


def _what_it_holds(obj: object) -> str:
    if isinstance(obj, dict):
        odd = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        return f"its entry {odd!r} is of type {type(obj[odd]).__name__}"
    return f"it holds an object of type {type(obj).__name__}"


def read_state_dict(path: str | Path, flag: str = "--backbone.weights") -> dict[str, torch.Tensor]:
    obj = read_weight_file(path, flag)
    for key in ("state_dict", "model", "module"):  # Lightning ckpt, DeiT/MAE-style, DDP wrappers
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightLoadingError(f"{flag}: {path} is not a state dict of tensors: {_what_it_holds(obj)}; "
                                 f"expected {FORMATS}")
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


DINO_TEACHER_PREFIX = "teacher_"
"""Our DINO checkpoints hold the student as ``backbone.*`` and the EMA teacher as ``teacher_backbone.*``
(lightningmodules/dino.py). The teacher is what DINO evaluates (its k-NN, linear and segmentation results and
attention maps are the teacher's), so :func:`choose_prefix` takes it: each known layout ``backbone.…`` is tried
as ``teacher_backbone.…`` first."""


def with_dino_teacher(prefixes: Sequence[str]) -> list[str]:
    """``prefixes`` with ``teacher_backbone.…`` tried before each ``backbone.…`` (see DINO_TEACHER_PREFIX)."""
    out: list[str] = []
    for prefix in prefixes:
        if prefix.startswith("backbone."):
            out.append(DINO_TEACHER_PREFIX + prefix)
        out.append(prefix)
    return out


def choose_prefix(state: dict[str, torch.Tensor], target_keys: set[str],
                  prefixes: Sequence[str]) -> tuple[dict[str, torch.Tensor], str]:
    """The first of ``prefixes`` (known layouts, e.g. our checkpoints' 'model.backbone.vit.') under which
    some file key matches the target; otherwise the prefix found by :func:`strip_common_prefix`. A DINO
    checkpoint of ours gives its teacher backbone (``teacher_backbone.…``; see DINO_TEACHER_PREFIX)."""
    for prefix in with_dino_teacher(prefixes):
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
    flag: str = "--backbone.weights",
    target_name: str = "backbone",
    hint: str = BACKBONE_HINT,
) -> LoadReport:
    """Load ``path`` into ``module``. ``prefixes``: known key layouts to try first; ``select``: keep only
    the (prefix-stripped) keys it accepts; ``convert`` adapts the file to the module (pos-embed resizing).
    ``flag`` (the option that named the file), ``target_name`` (what ``module`` is) and ``hint`` (the options
    that shape it) go into the log line and the errors."""
    state = read_state_dict(path, flag)
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
            f"{flag}: {path}: none of its {len(state)} tensors match this {target_name} "
            f"(file keys look like {_preview(sorted(state), 3)}; {target_name} keys look like {_preview(sorted(target), 3)})"
        )
    for key in matched:
        if state[key].shape != target[key].shape:
            raise WeightLoadingError(
                f"{flag}: {path}: tensor {key!r} has shape {tuple(state[key].shape)} but the {target_name} expects "
                f"{tuple(target[key].shape)} — the file was made for a different architecture ({hint})"
            )
    result = module.load_state_dict(state, strict=False)
    report = LoadReport(str(path), len(matched), list(result.missing_keys), list(result.unexpected_keys), dropped)
    if prefix.startswith(DINO_TEACHER_PREFIX):
        log.info("%s %s: a DINO checkpoint; loading its teacher backbone (%s*), as DINO evaluates", flag, path, prefix)
    elif prefix:
        log.info("%s %s: stripped key prefix %r", flag, path, prefix)
    if (report.missing or report.unexpected) and strict:
        raise WeightLoadingError(f"{flag} (strict, --backbone.strict_weights): {report.summary()}")
    (log.warning if report.missing or report.unexpected else log.info)("%s: %s", flag, report.summary())
    return report


# ------------------------------------------------------------------------------------ published weights
def torch_hub_file(url: str) -> Path:
    """Where torch.hub (torchvision's weights, timm's URL weights) caches the download of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name


def check_cached_file(path: Path, flag: str, url: str) -> None:
    """A cached download must be readable (a copy placed there by hand may be truncated)."""
    try:
        read_weight_file(path, flag, mmap=True)
    except WeightLoadingError as err:
        raise WeightLoadingError(f"{err} — it is the cached download of {url}: delete it to download again") from None


@contextlib.contextmanager
def published_weights(flag: str, what: str, url: str, cached: Optional[Path], alternative: str,
                      hf_hub_offline: bool = False, check_cache: bool = True) -> Iterator[None]:
    """Around library code that loads ``what`` from its cache file ``cached`` when that exists, and
    downloads ``url`` otherwise. Without the cached file: ``hf_hub_offline`` (HF_HUB_OFFLINE=1) fails at once,
    else one quick connection attempt decides; a failed download becomes one WeightLoadingError line naming
    ``flag``, the URL and the ``alternative`` that needs no network. ``check_cache``: first make sure the
    cached file is a readable weight file (off for formats torch.load does not read, e.g. timm's .npz)."""
    if cached is not None and cached.is_file():
        if check_cache:
            check_cached_file(cached, flag, url)
        yield
        return
    offline_hint = f"; offline: {alternative}"
    if hf_hub_offline:
        raise WeightLoadingError(f"{flag}: {what} are not in the local cache and HF_HUB_OFFLINE is set, so they "
                                 f"cannot be downloaded from {url}{offline_hint}")
    problem = connection_problem(url)
    if problem:
        raise WeightLoadingError(f"{flag}: cannot download {what} from {url}: {problem}{offline_hint}")
    log.info("%s: downloading %s from %s", flag, what, url)
    try:
        yield
    except OSError as err:  # urllib's URLError, huggingface_hub's HTTP and offline errors, a full disk
        raise WeightLoadingError(f"{flag}: downloading {what} from {url} failed: {one_line(err, 200)}"
                                 f"{offline_hint}") from None
    except RuntimeError as err:
        if "hash" not in str(err):  # torch.hub's check of the downloaded file's hash; anything else is a bug
            raise
        raise WeightLoadingError(f"{flag}: the download of {what} from {url} is damaged ({one_line(err, 120)})"
                                 f"{offline_hint}") from None


def torchvision_weights(weights, flag: str, what: str, alternative: str) -> contextlib.AbstractContextManager:
    """:func:`published_weights` for a torchvision ``WeightsEnum`` member (cached under torch.hub's dir);
    ``alternative`` may name the cache file as {cached}."""
    cached = torch_hub_file(weights.url)
    return published_weights(flag, what, weights.url, cached,
                             alternative.format(cached=cached))


def _hf_cached(repo_id: str, filenames: Sequence[str], revision: Optional[str]) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


@contextlib.contextmanager
def timm_published_weights(name: str, flag: str = "--backbone.pretrained") -> Iterator[dict]:
    """Around ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)``, yielding
    ``overlay``. Hub weights already in the Hugging Face cache: ``{'file': PATH, ...}``, so timm reads that
    file and nothing touches the network, not even huggingface_hub's check for a newer revision (timm's hub
    weights do not change). Otherwise ``{}``: timm downloads them as usual (or reads torch.hub's cache, for
    the few ViTs published by URL only), after :func:`published_weights`' checks."""
    import timm
    from timm.models._hub import hf_split

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightLoadingError(f"{flag}: timm publishes no weights for {name}; "
                                 "python -c \"import timm; print(timm.list_models('vit_*', pretrained=True))\" lists those that have")
    alternative = "download that file elsewhere and pass --backbone.weights PATH instead of --backbone.pretrained"
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        repo_id, revision = hf_split(cfg.hf_hub_id)
        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if filenames[0] == "pytorch_model.bin":
            filenames.insert(0, "model.safetensors")  # timm prefers the safetensors twin when there is one
        cached = _hf_cached(repo_id, filenames, revision)
        url = f"{constants.ENDPOINT}/{repo_id}/resolve/{revision or 'main'}/{filenames[0]}"
        with published_weights(flag, f"the {name} weights", url, cached, alternative,
                               hf_hub_offline=constants.HF_HUB_OFFLINE):
            # custom_load: on the hub path timm loads a plain state dict even where the URL file needed a
            # custom loader (.npz); with 'file' it would call that loader on the hub's safetensors file.
            yield {"file": str(cached), "custom_load": False} if cached else {}
        return
    cached, url = torch_hub_file(cfg.url), cfg.url
    alternative += f", or copy it to {cached}"
    with published_weights(flag, f"the {name} weights", url, cached, alternative,
                           check_cache=not cfg.custom_load):
        yield {}  # timm's own URL loader reads torch.hub's cache first
