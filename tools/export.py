"""Export a trained backbone for use outside this project: safetensors weights plus a small JSON describing
the architecture.

    python -m tools.export RUN_OR_CKPT [--out PREFIX]

``RUN_OR_CKPT`` is a run directory (its ``checkpoints/last.ckpt`` is exported) or one ``.ckpt`` file of a
run (e.g. ``checkpoints/best-e013-s112.ckpt``). The backbone exported is the one evaluation reads: a Barlow
Twins or segmentation run's backbone, DINO's *teacher*. Written (default ``<run>/export/<ckpt>_backbone``):

- ``PREFIX.safetensors``: the backbone's tensors under timm's (ViT) or torchvision's (ResNet-50) own names;
- ``PREFIX.json``: the library, the model name and the keyword arguments that rebuild the architecture, and
  where the weights came from (run, checkpoint, task, step, epoch).

A ViT loads in plain timm, with no code of this project and no network::

    import json, timm
    spec = json.load(open("PREFIX.json"))
    model = timm.create_model(spec["model_name"], pretrained=True,
                              pretrained_cfg_overlay=dict(file="PREFIX.safetensors"), **spec["kwargs"])

``model.forward_features(x)`` then gives the tokens the backbone gave inside the run, ``model(x)`` its
image embedding (CLS token or mean patch token, as ``--backbone.global_pool``). A ResNet-50 (BatchNorm or
frozen-statistics BatchNorm) loads into ``torchvision.models.resnet50()`` with ``fc`` replaced by
``torch.nn.Identity()``; a GroupNorm ResNet-50 and the raw-pixel baseline are refused (no such plain model).

Errors are one line and exit status 2: a path that does not exist, a run directory without a checkpoint, a
file that is not a checkpoint of this project, a backbone that has no plain timm/torchvision form.
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
EXPORT_DIR = "export"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """Input that cannot be exported; the message names the path and what would be valid."""


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint file a RUN_OR_CKPT argument names."""
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory (give a run directory or a .ckpt file of one)")
    if path.is_dir():
        ckpt = path / CHECKPOINT_DIR / LAST_CHECKPOINT
        if not ckpt.is_file():
            others = sorted((path / CHECKPOINT_DIR).glob("*.ckpt")) if (path / CHECKPOINT_DIR).is_dir() else []
            hint = f"; give one of its checkpoints instead, e.g. {others[0]}" if others else (
                "; it saved no checkpoint yet (one is written at every epoch end)")
            raise ExportError(f"{path} holds no {CHECKPOINT_DIR}/{LAST_CHECKPOINT}{hint}")
        return ckpt
    return path


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents (memory-mapped), or one line saying why ``path`` is not one of ours."""
    import zipfile

    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        if not zipfile.is_zipfile(path):  # torch.save's format; a YAML or text file would get a cryptic mmap error
            raise ValueError("not a PyTorch checkpoint archive")
        import torch  # local import of a library: only a file that may be a checkpoint pays for it

        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"{path} is not a readable checkpoint ({reason[:160]}); give a run directory or a "
                          f".ckpt file from its {CHECKPOINT_DIR}/ folder") from None
    config = (ckpt.get("hyper_parameters") or {}).get("config") if isinstance(ckpt, dict) else None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(config, dict):
        raise ExportError(f"{path} is not a checkpoint of this project (no state_dict with the run's config); "
                          f"give a run directory or a .ckpt file from its {CHECKPOINT_DIR}/ folder")
    return ckpt


def backbone_prefix(task: str, state: dict, vit: bool) -> tuple[str, str]:
    """(key prefix of the backbone's own module in the checkpoint, role): DINO's teacher, else the backbone."""
    inner = "vit." if vit else "model."
    candidates = {"dino": [("teacher_backbone." + inner, "teacher")],
                  "segmentation": [("model.backbone." + ("vit." if vit else ""), "backbone")]}.get(
        task, [("backbone." + inner, "backbone")])
    for prefix, role in candidates:
        if any(k.startswith(prefix) for k in state):
            return prefix, role
    raise ExportError(f"the checkpoint holds no backbone tensors under {candidates[0][0]}* (task {task}); "
                      "it is not a checkpoint of this project's models")


def vit_spec(cfg) -> dict[str, Any]:
    """timm's model name and the keyword arguments that rebuild the run's ViT (no classifier)."""
    import timm

    from models.backbones.vit import arch_overrides, architecture_name  # local: tools sit above models

    name = timm.models.split_model_name_tag(architecture_name(cfg.backbone.name))[0]
    # fc_norm=False: the final norm stays before the pooling, as inside our backbone (timm would otherwise move
    # it after an 'avg' pooling, which is another architecture with other tensor names).
    kwargs = {"num_classes": 0, "img_size": cfg.data.img_size, "dynamic_img_size": True,
              "global_pool": cfg.backbone.global_pool, "fc_norm": False, **arch_overrides(cfg.backbone)}
    return {"library": "timm", "model_name": name, "kwargs": kwargs}


def export(source: str | Path, out: Optional[str | Path] = None) -> tuple[Path, Path]:
    """Write ``<out>.safetensors`` and ``<out>.json`` for the backbone of ``source``; returns both paths."""
    ckpt_path = resolve_checkpoint(Path(source))  # path errors come before torch is imported (seconds)
    ckpt = read_checkpoint(ckpt_path)

    from safetensors.torch import save_file

    from config.loading import from_dict  # local: keeps --help and path errors free of torch imports
    from models.backbones import is_vit  # local: torch and timm load only once the path is known to be good

    cfg = from_dict(ckpt["hyper_parameters"]["config"], source=str(ckpt_path))
    name = cfg.backbone.name
    if name == "pixels":
        raise ExportError(f"{ckpt_path}: --backbone.name=pixels is the raw-pixel baseline; it has no weights to export")
    vit = is_vit(name)
    if not vit and name != "resnet50":
        raise ExportError(f"{ckpt_path}: backbone {name!r} has no plain timm or torchvision form to export to")
    if not vit and cfg.backbone.resnet_norm == "group":
        raise ExportError(f"{ckpt_path}: a GroupNorm ResNet-50 (--backbone.resnet_norm=group) is not torchvision's "
                          "resnet50 and cannot be exported as its state dict; BatchNorm and frozen ResNet-50s can")
    state = ckpt["state_dict"]
    prefix, role = backbone_prefix(cfg.task, state, vit)
    tensors = {k[len(prefix):]: v.detach().contiguous().clone() for k, v in state.items() if k.startswith(prefix)}
    if vit:
        spec = vit_spec(cfg)
    else:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
        spec = {"library": "torchvision", "model_name": "resnet50", "kwargs": {},
                "note": "the backbone has no classifier: set model.fc = torch.nn.Identity() before load_state_dict"}
    if out is None:
        run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == CHECKPOINT_DIR else ckpt_path.parent
        out = run_dir / EXPORT_DIR / f"{ckpt_path.stem}_{role}"
    out = Path(out)
    weights, spec_file = out.with_name(out.name + ".safetensors"), out.with_name(out.name + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    spec.update({
        "format_version": FORMAT_VERSION,
        "weights": weights.name,
        "source": {"checkpoint": str(ckpt_path), "task": cfg.task, "role": role, "backbone": name,
                   "global_step": int(ckpt.get("global_step", 0)), "epoch": int(ckpt.get("epoch", 0)),
                   "img_size": cfg.data.img_size},
    })
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")
    return weights, spec_file


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ExportError(f"{message} (see python -m tools.export --help)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _ArgParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="RUN_OR_CKPT", help="run directory (its checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("--out", default=None, help="output path without extension (default: "
                                                    "<run>/export/<checkpoint>_<teacher|backbone>)")
    try:
        args = parser.parse_args(argv)
        weights, spec_file = export(args.source, args.out)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    spec = json.loads(spec_file.read_text())
    print(f"exported the {spec['source']['role']} ({spec['library']} {spec['model_name']}, step "
          f"{spec['source']['global_step']}) to {weights} and {spec_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
