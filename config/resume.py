"""``--trainer.resume``: from a .ckpt file, a run directory or 'auto' to the checkpoint a run continues from, and
the checks that it belongs to the run directory it sits in and to the config's task. Part of parsing the config
(a resumed run's ``config.yaml`` is a layer of it, see ``config.loading.parse_config``); every failure is a
one-line :class:`ConfigError`. Reading a checkpoint imports torch, lazily: a new run's config errors come without.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from config.errors import ConfigError
from config.hparams import Hparams

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_FILE = "run.json"  # the run's identity: run_id, name, task, creation time
META_KEY = "vitssl"  # our metadata in each checkpoint (callbacks/checkpointing.py writes it)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, memory-mapped (tensors are read lazily); one-line error for anything that
    is not a complete checkpoint (empty, truncated, garbage, another format)."""
    import torch

    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--trainer.resume: {path} is not a readable checkpoint ({reason[:160]}); give last.ckpt "
                          f"of a run directory, or the run directory itself") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise ConfigError(f"--trainer.resume: {path} is not a training checkpoint of this tool (no state_dict/"
                          f"global_step); to start from its weights use --backbone.weights={path}")
    return ckpt

def checkpoint_task(ckpt: dict) -> Optional[str]:
    meta = ckpt.get(META_KEY) or {}
    if meta.get("task"):
        return meta["task"]
    config = (ckpt.get("hyper_parameters") or {}).get("config") or {}
    return config.get("task")

def read_run_file(run_dir: Path) -> dict:
    import json

    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}

def checkpoint_run_dir(path: Path) -> Path:
    """The run directory a checkpoint belongs to: ``<run>/checkpoints/<file>.ckpt`` with ``<run>/config.yaml``."""
    run_dir = path.resolve().parent.parent
    if path.resolve().parent.name != CHECKPOINT_DIR or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--trainer.resume: {path} is not inside a run directory (<run>/{CHECKPOINT_DIR}/*.ckpt "
                          f"beside <run>/config.yaml), and a resumed run writes only into its own directory; to start "
                          f"a new run from its weights use --backbone.weights={path}")
    return run_dir

def find_resume_checkpoint(cfg: Hparams) -> Optional[Path]:
    """Turn ``trainer.resume`` (a .ckpt file, a run directory or 'auto') into a checkpoint path; None for
    'auto' when the named run does not exist yet (a new run starts). One-line errors otherwise."""
    value = cfg.trainer.resume
    if not value:
        return None
    if value == "auto":
        if not cfg.log.run_name:
            raise ConfigError("--trainer.resume=auto needs --log.run_name=NAME (it resumes that run if it exists, else "
                              "starts it); without a name it could pick up an unrelated run")
        run_dir = Path(cfg.log.output_dir) / cfg.log.run_name
        if not run_dir.exists():
            log.info("--trainer.resume=auto: %s does not exist yet; starting it", run_dir)
            return None
        path = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"--trainer.resume=auto: run directory {run_dir} exists but holds no {CHECKPOINT_DIR}/"
                              f"{LAST_CHECKPOINT} (it stopped before its first checkpoint); remove it to start the run "
                              f"over, or choose another --log.run_name")
        return path
    path = Path(value)
    if path.is_dir():
        path = path / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"--trainer.resume: checkpoint {value!r} does not exist "
                          f"(give a .ckpt file, a run directory, or 'auto' with --log.run_name)")
    return path

def check_resume(cfg: Hparams, ckpt_path: Path, ckpt: dict) -> None:
    """The checkpoint belongs to the run directory it sits in, and to this config's task."""
    run_dir = checkpoint_run_dir(ckpt_path)
    meta = ckpt.get(META_KEY) or {}
    run_id = read_run_file(run_dir).get("run_id")
    if meta.get("run_id") and run_id and meta["run_id"] != run_id:
        raise ConfigError(f"--trainer.resume: {ckpt_path} was written by run {meta.get('run_name', '?')} "
                          f"(id {meta['run_id']}), not by the run in {run_dir} (id {run_id}); copy checkpoints only "
                          f"together with their run directory")
    task = checkpoint_task(ckpt)
    if task and task != cfg.task:
        raise ConfigError(f"--task={cfg.task} cannot resume {ckpt_path}, a {task} checkpoint; to use its weights in "
                          f"a new {cfg.task} run give --backbone.weights={ckpt_path} without --trainer.resume")
