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
from config.run_names import run_name_problem

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_FILE = "run.json"  # the run's identity: run_id, name, task, creation time
META_KEY = "vitssl"  # our metadata in each checkpoint (callbacks/checkpointing.py writes it)
LOCK_FILE = "run.lock"  # held by the one process training the run (utils/run_dir.py: lock_run_dir)
RESTART_ATTR = "restart_existing_run"
"""Set on ``cfg.trainer`` (an attribute, not a config field) by :func:`find_resume_checkpoint` when ``--trainer.resume
auto`` finds its run stopped before its first checkpoint: ``utils.run_dir.prepare_run_dir`` starts it over in place."""


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
        problem = run_name_problem(cfg.log.run_name, cfg.log.output_dir)  # '../x' would resume a run elsewhere
        if problem:
            raise ConfigError(problem)
        run_dir = Path(cfg.log.output_dir) / cfg.log.run_name
        if not run_dir.exists():
            log.info("--trainer.resume=auto: %s does not exist yet; starting it", run_dir)
            return None
        path = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        if not path.is_file() and restartable(run_dir, cfg.task):
            # preempted or killed during start-up: nothing to continue, nothing to lose; start it over in place
            setattr(cfg.trainer, RESTART_ATTR, True)
            return None
        if not path.is_file():
            run_task = read_run_file(run_dir).get("task")
            if run_task and run_task != cfg.task and not saved_checkpoints(run_dir):
                raise ConfigError(f"--task={cfg.task} cannot resume {run_dir}, a {run_task} run (stopped before its "
                                  f"first checkpoint); give its own --task, or choose another --log.run_name")
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


def saved_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (``last.ckpt``, ``best-*.ckpt``), not the hidden temporary files of a
    write that was killed midway (``.tmp-<pid>-last.ckpt``, never a checkpoint)."""
    return [p for p in (run_dir / CHECKPOINT_DIR).glob("*.ckpt") if not p.name.startswith(".")]


# What a run directory may hold when its process stopped between creating it and writing run.json.
_BEFORE_RUN_FILE = (LOCK_FILE,)


def restartable(run_dir: Path, task: str) -> bool:
    """Whether ``run_dir`` holds a run of this tool and ``task`` that stopped during start-up: it has no
    checkpoint at all, and either its ``run.json`` (written at creation, whole or not at all) or, when the
    process stopped before writing that, nothing but its lock file. Such a directory has nothing to continue
    and nothing to lose: ``--trainer.resume auto`` starts the run over in it."""
    if not run_dir.is_dir() or run_dir.is_symlink():
        return False
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if ckpt_dir.exists() and (not ckpt_dir.is_dir() or saved_checkpoints(run_dir)):
        return False
    record = read_run_file(run_dir)
    if record.get("run_id"):
        return record.get("task") in (None, task)
    return all(p.name in _BEFORE_RUN_FILE or p.name.startswith(f".{RUN_FILE}.tmp-") for p in run_dir.iterdir())


EPOCH_STRUCTURE = ("data.batch_size", "data.dataset", "data.pretrain_images", "data.synthetic_train",
                   "trainer.limit_train_batches", "trainer.devices", "trainer.num_nodes")
"""The settings that decide which batches an epoch consists of: a mid-epoch resume must keep them."""


def _dotted(mapping: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def check_continuity(cfg: Hparams, ckpt_path: Path, ckpt: dict) -> None:
    """A resume continues its run from where it stopped. Refused in one line, before anything is written:

    - a checkpoint older than the run's ``last.ckpt`` (e.g. ``best-*.ckpt``): it would discard the newer
      steps (unless ``--trainer.allow_rewind``);
    - ``--trainer.max_epochs`` / ``--trainer.max_steps`` below what the run has already trained: nothing can
      be trained and the run's config.yaml would claim a shorter run than its checkpoints hold;
    - a mid-epoch checkpoint with another epoch structure (:data:`EPOCH_STRUCTURE`, compared with the run's
      config.yaml): the rest of that epoch would be cut differently (unless ``--trainer.allow_rewind``).
    """
    import yaml

    run_dir = checkpoint_run_dir(ckpt_path)
    step = int(ckpt.get("global_step", 0))
    meta = ckpt.get(META_KEY) or {}
    allow = cfg.trainer.allow_rewind
    last = ckpt_path.parent / LAST_CHECKPOINT
    if not allow and last.is_file() and ckpt_path.resolve() != last.resolve():
        last_step = int(read_checkpoint(last).get("global_step", 0))
        if last_step > step:
            raise ConfigError(f"--trainer.resume: {ckpt_path} is at step {step}, behind the run's {LAST_CHECKPOINT} "
                              f"(step {last_step}): continuing from it would discard steps {step + 1}-{last_step} and "
                              f"overwrite {LAST_CHECKPOINT}; give the run directory {run_dir} to continue where it "
                              f"stopped, or add --trainer.allow_rewind true to go back to step {step}")
    epoch = int(ckpt.get("epoch", 0))
    started = epoch + 1  # the checkpoint is inside or at the end of epoch `epoch` (counted from 0)
    if cfg.trainer.max_epochs != -1 and cfg.trainer.max_epochs < started:
        raise ConfigError(f"--trainer.max_epochs={cfg.trainer.max_epochs}: run {run_dir} has already trained "
                          f"{'into epoch ' + str(started) if meta.get('batches_into_epoch') else str(started) + ' epochs'}"
                          f" ({ckpt_path.name} is at step {step}); a resume cannot train less than that: give "
                          f"--trainer.max_epochs {started} or more, or start a new run")
    if cfg.trainer.max_steps != -1 and cfg.trainer.max_steps < step:
        raise ConfigError(f"--trainer.max_steps={cfg.trainer.max_steps}: run {run_dir} has already trained {step} "
                          f"steps ({ckpt_path.name}); give --trainer.max_steps {step} or more, or start a new run")
    into = int(meta.get("batches_into_epoch") or 0)
    if allow or not into:
        return
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    for dotted in EPOCH_STRUCTURE:
        before = _dotted(saved, dotted)
        group, name = dotted.split(".")
        now = getattr(getattr(cfg, group), name)
        if before is not None and before != now:
            raise ConfigError(f"--{dotted}={now} differs from the run's {before} while {ckpt_path.name} stops inside "
                              f"epoch {epoch} (after {into} batches): the rest of that epoch would be cut differently "
                              f"(batches skipped or repeated, its validation lost); resume with {before} and change "
                              f"it at an epoch end, or add --trainer.allow_rewind true to accept it")


def run_finished(cfg: Hparams, ckpt: dict) -> bool:
    """Whether the checkpoint ends the run as configured (a requeue of a finished run: nothing to train, and
    nothing of what the run logged at its end may be dropped)."""
    meta = ckpt.get(META_KEY) or {}
    step = int(ckpt.get("global_step", 0))
    if cfg.trainer.max_steps != -1 and step >= cfg.trainer.max_steps:
        return True
    done = meta.get("epochs_completed")
    return done is not None and cfg.trainer.max_epochs != -1 and int(done) >= cfg.trainer.max_epochs
