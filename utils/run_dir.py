"""The run directory: one folder per run holding everything needed to understand and resume it.

    runs/<run_name>/
        config.yaml            fully resolved config (give it back with --config to reproduce the run)
        checkpoints/last.ckpt  latest state (+ best-*.ckpt by validation loss)
        metrics.csv            every logged metric (Lightning CSV logger, beside wandb)
        media/                 images written by callbacks
        code/                  git commit, status and diff of the code that ran
        wandb/                 wandb files (offline runs can be synced with `wandb sync`)
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import subprocess
from pathlib import Path
from typing import Optional

from config.hparams import Hparams

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"


# The run name the first process chose, inherited by the processes Lightning's DDP launcher starts (they
# run main.py again and must write into the same run directory).
RUN_NAME_ENV = "VITSSL_RUN_NAME"


def launch_job_id() -> Optional[str]:
    """The job id shared by every process of a torchrun or SLURM launch (None for a single process)."""
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return os.environ["SLURM_JOB_ID"]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return run_id
    return None


def external_launch() -> bool:
    """Started by torchrun/SLURM as one of several processes (not by Lightning's own launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and RUN_NAME_ENV not in os.environ


def global_rank() -> int:
    from pytorch_lightning.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def default_run_name(cfg: Hparams) -> str:
    backbone = cfg.backbone.name.replace("/", "-")
    if os.environ.get(RUN_NAME_ENV):
        return os.environ[RUN_NAME_ENV]
    if launch_job_id():
        # Every process of the launch computes the same name (a timestamp could differ between them).
        return f"{cfg.task}-{backbone}-job{launch_job_id()}"
    if external_launch():
        from config.loading import ConfigError

        raise ConfigError("several processes were launched (WORLD_SIZE > 1) without a shared job id: give them "
                          "one run directory with --log.run_name=NAME (or torchrun --rdzv-id=ID)")
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        # Several agents may start in the same second: the agent's run id keeps their directories apart.
        return f"{cfg.task}-{backbone}-sweep-{os.environ['WANDB_SWEEP_ID']}-{os.environ['WANDB_RUN_ID']}"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{cfg.task}-{backbone}-{stamp}"


def run_directory(cfg: Hparams) -> Path:
    """The run's folder; fixes ``cfg.log.run_name`` if it was empty."""
    if not cfg.log.run_name:
        cfg.log.run_name = default_run_name(cfg)
    return Path(cfg.log.output_dir) / cfg.log.run_name


def resolve_resume(cfg: Hparams) -> Optional[Path]:
    """Turn ``trainer.resume`` into a checkpoint path, or None for 'auto' when there is nothing to resume."""
    from config.loading import ConfigError

    value = cfg.trainer.resume
    if not value:
        return None
    if value == "auto":
        out = Path(cfg.log.output_dir)
        if cfg.log.run_name:
            candidates = [out / cfg.log.run_name / CHECKPOINT_DIR / LAST_CHECKPOINT]
        else:
            candidates = sorted(out.glob(f"*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
            candidates = candidates[-1:]
        found = [c for c in candidates if c.is_file()]
        if not found:
            log.warning("--trainer.resume=auto: no %s found under %s; starting a new run", LAST_CHECKPOINT, out)
            cfg.trainer.resume = ""
            return None
        return found[-1]
    path = Path(value)
    if path.is_dir():
        path = path / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not path.is_file():
        raise ConfigError(
            f"--trainer.resume: checkpoint {value!r} does not exist "
            f"(give a .ckpt file, a run directory, or 'auto')"
        )
    return path


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20,
                             cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def save_code_state(run_dir: Path) -> None:
    """Record which code ran (commit, status, uncommitted diff), as the report's authors did."""
    code = run_dir / "code"
    code.mkdir(parents=True, exist_ok=True)
    commit = _git("rev-parse", "HEAD")
    (code / "git_commit.txt").write_text(commit or "not a git checkout, or no commit yet\n")
    status = _git("status", "--porcelain")
    if status is not None:
        (code / "git_status.txt").write_text(status)
    diff = _git("diff", "HEAD")
    if diff is not None:
        (code / "git_diff.patch").write_text(diff)


def fresh_run_directory(cfg: Hparams) -> Path:
    """The run directory of a new (not resumed) run. An existing run is never written into: the name
    gets a numeric suffix instead (e.g. giving a run's config.yaml back with --config)."""
    run_dir = run_directory(cfg)
    if cfg.trainer.resume or not (run_dir / "config.yaml").exists():
        return run_dir
    if external_launch():
        from config.loading import ConfigError

        # Renaming on one process only would split the run over two directories.
        raise ConfigError(f"run directory {run_dir} already holds a run: continue it with --trainer.resume=auto "
                          "or choose a new --log.run_name")
    base, n = cfg.log.run_name, 1
    while (Path(cfg.log.output_dir) / f"{base}-{n}" / "config.yaml").exists():
        n += 1
    cfg.log.run_name = f"{base}-{n}"
    log.warning("run directory %s already holds a run; writing this one to %s-%d "
                "(--trainer.resume continues an existing run)", run_dir, base, n)
    return run_directory(cfg)


def prepare_run_dir(cfg: Hparams) -> Path:
    """Create the run directory (first process only; the others of a distributed run use the same one)."""
    if global_rank() > 0:
        return run_directory(cfg)
    run_dir = fresh_run_directory(cfg)
    os.environ[RUN_NAME_ENV] = cfg.log.run_name
    for sub in (CHECKPOINT_DIR, "media"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    save_code_state(run_dir)
    return run_dir
