"""The run directory: one folder per run holding everything needed to understand and resume it.

    runs/<run_name>/
        config.yaml            fully resolved config (give it back with --config to reproduce the run)
        run.json               the run's identity (run_id, also stored in each of its checkpoints)
        run.lock               held (flock) by the one process that trains the run; names it (pid, host)
        checkpoints/last.ckpt  latest state (+ best-*.ckpt by validation loss)
        metrics.csv            every logged metric (Lightning CSV logger, beside wandb)
        media/                 images written by callbacks
        code/                  git commit, status and diff of the code that ran; packages.txt: installed versions
        wandb/                 wandb files (offline runs can be synced with `wandb sync`)
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import subprocess
from pathlib import Path
from typing import Optional

from config.errors import ConfigError
from config.hparams import Hparams
from config.resume import CHECKPOINT_DIR, LOCK_FILE, RESTART_ATTR, RUN_FILE, read_run_file, restartable

log = logging.getLogger(__name__)



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
    if os.environ.get(RUN_NAME_ENV) and global_rank() > 0:  # a process started by Lightning's DDP launcher
        return os.environ[RUN_NAME_ENV]
    if launch_job_id():
        # Every process of the launch computes the same name (a timestamp could differ between them).
        return f"{cfg.task}-{backbone}-job{launch_job_id()}"
    if external_launch():
        raise ConfigError("several processes were launched (WORLD_SIZE > 1) without a shared job id: give them "
                          "one run directory with --log.run_name=NAME (or torchrun --rdzv-id=ID)")
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        # Several agents may start in the same second: the agent's run id keeps their directories apart.
        return f"{cfg.task}-{backbone}-sweep-{os.environ['WANDB_SWEEP_ID']}-{os.environ['WANDB_RUN_ID']}"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{cfg.task}-{backbone}-{stamp}"


def run_directory(cfg: Hparams) -> Path:
    """The run's folder; fixes ``cfg.log.run_name`` if it was empty."""
    if os.environ.get(RUN_NAME_ENV) and global_rank() > 0:
        cfg.log.run_name = os.environ[RUN_NAME_ENV]  # the directory the first process created (maybe renamed)
    if not cfg.log.run_name:
        cfg.log.run_name = default_run_name(cfg)
    return Path(cfg.log.output_dir) / cfg.log.run_name


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20,
                             cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def save_code_state(run_dir: Path) -> None:
    """Record which code ran (commit, status, uncommitted diff) and with which packages."""
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
    (code / "packages.txt").write_text(installed_packages())


def installed_packages() -> str:
    """Python version and every installed distribution as ``name==version`` (the format of
    requirements.lock, so the two can be diffed)."""
    import platform
    from importlib import metadata

    names = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            names[name.lower()] = f"{name}=={dist.version}"
    header = f"# python {platform.python_version()} on {platform.system()} {platform.machine()}\n"
    return header + "\n".join(names[k] for k in sorted(names)) + "\n"


def new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def _create_exclusively(out: Path, base: str) -> Path:
    """mkdir ``out/base`` (or ``base-1``, ``base-2``, ...): ``mkdir`` fails when the directory exists, so two
    processes can never get the same one, even when they start in the same millisecond."""
    n = 0
    while True:
        name = base if n == 0 else f"{base}-{n}"
        try:
            (out / name).mkdir()
            return out / name
        except FileExistsError:
            n += 1


def prepare_run_dir(cfg: Hparams, resumed: bool = False) -> Path:
    """The run directory: the checkpoint's own when resuming; else a new one, created exclusively (an existing
    run is never written into: the name gets a numeric suffix, with a warning), or, for ``--trainer.resume
    auto`` of a run that stopped before its first checkpoint, that run's own directory, started over (see
    :func:`restart_in_place`). Only the first process creates it and holds its lock (:func:`lock_run_dir`);
    the other processes of a distributed run use the same one."""
    if global_rank() > 0:
        return run_directory(cfg)
    if resumed:
        run_dir = run_directory(cfg)
        lock_run_dir(run_dir)
    elif getattr(cfg.trainer, RESTART_ATTR, False):
        run_dir = run_directory(cfg)
        lock_run_dir(run_dir)
        restart_in_place(run_dir, cfg)
    else:
        wanted = run_directory(cfg)
        out = wanted.parent
        try:
            out.mkdir(parents=True, exist_ok=True)
            if external_launch():
                # Renaming on one process only would split the run over several directories.
                try:
                    wanted.mkdir()
                except FileExistsError:
                    raise ConfigError(f"run directory {wanted} already holds a run: continue it with "
                                      "--trainer.resume=auto or choose a new --log.run_name") from None
                run_dir = wanted
            else:
                run_dir = _create_exclusively(out, cfg.log.run_name)
        except OSError as err:
            raise ConfigError(f"--log.output_dir: cannot create a run directory in {out}: "
                              f"{os.strerror(err.errno) if err.errno else err}") from None
        lock_run_dir(run_dir)  # at once: a `resume auto` of this name meanwhile sees the run as taken
        if run_dir != wanted:
            log.warning("run directory %s already exists; writing this run to %s "
                        "(--trainer.resume continues an existing run)", wanted, run_dir)
            cfg.log.run_name = run_dir.name
        write_run_file(run_dir, cfg)
    os.environ[RUN_NAME_ENV] = cfg.log.run_name
    try:
        for sub in (CHECKPOINT_DIR, "media"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        save_code_state(run_dir)
    except OSError as err:
        raise ConfigError(f"--log.output_dir: cannot write into run directory {run_dir}: "
                          f"{os.strerror(err.errno) if err.errno else err}") from None
    return run_dir


# -- starting over a run that stopped before its first checkpoint ----------------------------------------------

# What a run writes into its directory before its first checkpoint (besides run.json and run.lock): removed
# when it starts over, so the directory ends as a run that was never interrupted. Anything else is left alone.
RUN_OUTPUTS = ("config.yaml", "metrics.csv", "tuning.yaml", "wandb_id.txt", "eval_metrics.yaml",
               "per_class_iou.csv", "code", "media", "wandb", CHECKPOINT_DIR)
RUN_TEMPORARIES = (".scale_batch_size_*.ckpt", ".lr_find_*.ckpt", ".config.yaml.tmp-*", f".{RUN_FILE}.tmp-*")


def restart_in_place(run_dir: Path, cfg: Hparams) -> None:
    """Start ``run_dir`` over: it holds a run of this tool that stopped (preempted, killed) during start-up,
    before its first checkpoint, so there is nothing to continue and nothing to lose. Called with the run's
    lock held; checked again under it (another process might have trained it meanwhile)."""
    import shutil

    if not restartable(run_dir, cfg.task):
        raise ConfigError(f"--trainer.resume=auto: run directory {run_dir} changed while this process started "
                          f"(it holds a checkpoint now); run the same command again to continue it")
    log.warning("--trainer.resume=auto: %s stopped before its first checkpoint; starting it over", run_dir)
    try:
        for name in RUN_OUTPUTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        for pattern in RUN_TEMPORARIES:
            for path in run_dir.glob(pattern):
                path.unlink()
        if not read_run_file(run_dir).get("run_id"):  # stopped before run.json was written
            write_run_file(run_dir, cfg)
    except OSError as err:
        raise ConfigError(f"--log.output_dir: cannot write into run directory {run_dir}: "
                          f"{os.strerror(err.errno) if err.errno else err}") from None


def write_run_file(run_dir: Path, cfg: Hparams) -> None:
    """``run.json``: the run's identity (every checkpoint carries the same ``run_id``), created exclusively
    and whole: written to a temporary file, then hard-linked to its name (fails if it exists), so that a kill
    never leaves an empty or partial run.json."""
    import datetime as dt
    import json

    record = {"run_id": new_run_id(), "run_name": run_dir.name, "task": cfg.task,
              "created": dt.datetime.now().isoformat(timespec="seconds")}
    tmp = run_dir / f".{RUN_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, run_dir / RUN_FILE)
    finally:
        tmp.unlink()


# -- one process per run directory ------------------------------------------------------------------------

_held_locks: dict[Path, int] = {}  # run directory -> open file descriptor holding its flock
NO_FLOCK_ERRNOS = {getattr(__import__("errno"), n) for n in ("ENOLCK", "EOPNOTSUPP", "ENOSYS", "EINVAL")
                   if hasattr(__import__("errno"), n)}
STALE_LOCK_WAIT_S = 15.0
"""How long a lock whose recorded holder is dead (this host) may still be held: DataLoader workers forked by
the dead process inherit the lock and notice their parent's death within a few seconds."""


def _holder(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _holder_text(holder: dict) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"process {pid} on host {host}{since}"


def _holder_alive(holder: dict) -> Optional[bool]:
    """True/False for a holder on this host; None when it runs on another host (cannot be checked)."""
    import socket

    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_run_dir(run_dir: Path) -> None:
    """Hold ``<run_dir>/run.lock`` (an exclusive ``flock``) for as long as this process lives (or until
    :func:`release_run_locks`): a second process that would train the same run gets a one-line error naming
    the holder (pid, host). The kernel drops the lock when its holder dies, so a lock left by a killed
    process never blocks. Only the launching process (rank 0) takes it. On a file system without ``flock``
    (some NFS set-ups) the file's record still refuses a live holder on this host; otherwise a warning."""
    import datetime as dt
    import fcntl
    import json
    import socket
    import time

    run_dir = Path(run_dir)
    if global_rank() > 0 or run_dir.resolve() in _held_locks:
        return
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"--log.output_dir: cannot write into run directory {run_dir}: "
                          f"{os.strerror(err.errno) if err.errno else err}") from None
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(path)
            if _holder_alive(holder) is False:  # its holder died: wait for the workers it forked
                deadline = deadline or time.monotonic() + STALE_LOCK_WAIT_S
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
            os.close(fd)
            raise ConfigError(f"run directory {run_dir} is in use by {_holder_text(holder)}: one process per run; "
                              f"wait for it to end or stop it (kill -TERM {holder.get('pid', 'PID')}), then "
                              f"run this command again") from None
        except OSError as err:
            if err.errno not in NO_FLOCK_ERRNOS:
                os.close(fd)
                raise
            holder = _holder(path)
            if _holder_alive(holder) and holder.get("pid") != os.getpid():
                os.close(fd)
                raise ConfigError(f"run directory {run_dir} is in use by {_holder_text(holder)}: one process per "
                                  f"run; wait for it to end or stop it, then run this command again") from None
            log.warning("%s: this file system does not support file locks; make sure no other process trains "
                        "this run at the same time", path)
            break
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": dt.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held_locks[run_dir.resolve()] = fd


def release_run_locks() -> None:
    """Give up every run lock this process holds (a process that runs several runs, e.g. tests)."""
    import fcntl

    for run_dir, fd in list(_held_locks.items()):
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)
        del _held_locks[run_dir]


def run_meta(run_dir: Path, cfg: Hparams) -> dict:
    """What every checkpoint of this run records about it (see ``callbacks.checkpointing.RunCheckpoint``)."""
    record = read_run_file(run_dir)
    return {"run_id": record.get("run_id", ""), "run_name": run_dir.name, "task": cfg.task}
