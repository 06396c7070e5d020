"""Loggers: a CSV logger that keeps a resumed run's history, wandb with an offline fallback, and TensorBoard."""
from __future__ import annotations

import csv
import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from config.hparams import Hparams
from config.loading import to_dict
from utils.run_dir import global_rank

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"


class _KeepingExperimentWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; this one appends to it (resumed runs)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _check_log_dir_exists(self) -> None:  # the run directory is ours and already holds config.yaml
        pass


class RunCSVLogger(CSVLogger):
    """Writes ``<run_dir>/metrics.csv``; on resume, rows logged after the checkpoint are dropped first."""

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None):
        super().__init__(save_dir=str(run_dir), name="", version="")
        if resume_step is not None and global_rank() == 0:
            drop_rows_from_step(run_dir / METRICS_FILE, resume_step)

    @property
    def log_dir(self) -> str:
        return self.root_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingExperimentWriter(log_dir=self.root_dir)
        return self._experiment

    def log_hyperparams(self, params=None) -> None:  # config.yaml already records them
        pass


def drop_rows_from_step(path: Path, step: int) -> None:
    """Remove rows logged at or after ``step`` (work after the last checkpoint, redone on resume)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if r.get("step", "") == "" or int(float(r["step"])) < step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)


TENSORBOARD_DIR = "tensorboard"


class RunTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger writing event files to ``<run_dir>/tensorboard/`` (a resumed run adds a
    new event file there; TensorBoard joins them by step). The config is not repeated as hparams: config.yaml
    records it, and TensorBoard's hparams tab would only show a flat copy."""

    def __init__(self, run_dir: Path):
        super().__init__(save_dir=str(run_dir), name=TENSORBOARD_DIR, version="", default_hp_metric=False)

    def log_hyperparams(self, params=None, metrics=None) -> None:
        pass


def wandb_credentials_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def effective_wandb_mode(cfg: Hparams) -> str:
    mode = cfg.log.wandb_mode
    if mode == "online" and not wandb_credentials_available():
        log.warning("wandb: no credentials (WANDB_API_KEY or `wandb login`); logging offline under the run "
                    "directory instead — upload later with `wandb sync`")
        return "offline"
    return mode


def build_wandb_logger(cfg: Hparams, run_dir: Path, mode: str) -> WandbLogger:
    id_file = run_dir / "wandb_id.txt"
    if global_rank() > 0:
        # Lightning gives the other processes a dummy experiment: they log nothing and must write nothing (under
        # torchrun/SLURM they may get here before the first process has created the run directory).
        run_id = None
    elif os.environ.get("WANDB_RUN_ID"):  # under a wandb sweep agent: the agent's id is the one wandb uses
        run_id = os.environ["WANDB_RUN_ID"]
        id_file.write_text(run_id + "\n")
    elif id_file.is_file():  # resumed run: continue the same wandb run
        run_id = id_file.read_text().strip()
    else:
        alphabet = string.ascii_lowercase + string.digits
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))  # wandb's own id format
        id_file.write_text(run_id + "\n")
    tags = [t.strip() for t in cfg.log.wandb_tags.split(",") if t.strip()]
    logger = WandbLogger(
        name=cfg.log.run_name,
        project=cfg.log.wandb_project,
        entity=cfg.log.wandb_entity or None,
        save_dir=str(run_dir),
        offline=mode == "offline",
        id=run_id,
        resume="allow",
        tags=tags or None,
        config=to_dict(cfg),
    )
    # Lightning 2.6 always passes wandb.init(anonymous=None); wandb >= 0.22 warns on every run that the
    # setting has no effect as soon as it is passed at all. Not passing it is what wandb asks for.
    logger._wandb_init.pop("anonymous", None)
    return logger
