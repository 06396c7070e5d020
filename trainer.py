"""Builds the LightningModule, DataModule, loggers, callbacks and Lightning Trainer from a config, and runs it."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from callbacks import visualisation_callbacks
from callbacks.epoch_timer import EpochTimer
from callbacks.finite_loss import FiniteLossGuard
from callbacks.rng_state import RNGStateCheckpoint
from config.hparams import Hparams
from config.loading import save_config, to_dict
from lightningmodules import TASKS, Task
from utils.loggers import RunCSVLogger, build_wandb_logger, effective_wandb_mode
from utils.run_dir import CHECKPOINT_DIR, global_rank, prepare_run_dir
from utils.tuning import tune

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: Hparams
    run_dir: Path
    task: Task
    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    trainer: pl.Trainer


def resolve_precision(cfg: Hparams) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def _batches(value: float) -> float | int:
    """Lightning reads an int as a number of batches and a float as a fraction."""
    return int(value) if value > 1 else float(value)


def checkpoint_step(path: str) -> int:
    # mmap: reads the small "global_step" entry without pulling every tensor off the disk
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


def build_callbacks(cfg: Hparams, task: Task, ckpt_dir: Path) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = [
        FiniteLossGuard(cfg.trainer.finite_check_every_n_steps),
        RNGStateCheckpoint(),
        EpochTimer(),
        # last.ckpt at every epoch end: a crash loses at most one epoch (or checkpoint_every_n_steps).
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, every_n_epochs=1,
                        save_on_train_epoch_end=True),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.trainer.checkpoint_every_n_steps > 0:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True,
                                         every_n_train_steps=cfg.trainer.checkpoint_every_n_steps))
    if cfg.trainer.limit_val_batches > 0:
        callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, monitor=task.monitor, mode=task.mode, save_top_k=1,
            filename="best-e{epoch:03d}-s{step}", auto_insert_metric_name=False,
        ))
    callbacks += visualisation_callbacks(cfg)
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.trainer.progress_refresh_rate))
    return callbacks


def build(cfg: Hparams) -> Run:
    """Everything a run needs, from a validated config. Writes the run directory and config.yaml."""
    task = TASKS.get(cfg.task)
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = prepare_run_dir(cfg)
    if global_rank() == 0:
        save_config(cfg, run_dir / "config.yaml")

    resume_step = checkpoint_step(cfg.trainer.resume) if cfg.trainer.resume else None
    loggers: list = [RunCSVLogger(run_dir, resume_step=resume_step)]
    wandb_mode = effective_wandb_mode(cfg)
    if wandb_mode != "disabled":
        loggers.append(build_wandb_logger(cfg, run_dir, wandb_mode))

    module = task.module(to_dict(cfg))
    if cfg.trainer.compile:
        compile_model(module, cfg.trainer.compile_mode)
    datamodule = task.datamodule(cfg)
    trainer = pl.Trainer(
        default_root_dir=str(run_dir),
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        sync_batchnorm=cfg.trainer.sync_batchnorm,
        # Our samplers shard themselves across processes (datamodules/sampling.py) so that a run on W
        # devices sees the same global batches as one device; Lightning must not wrap them.
        use_distributed_sampler=False,
        precision=resolve_precision(cfg),
        max_epochs=cfg.trainer.max_epochs,
        max_steps=cfg.trainer.max_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        check_val_every_n_epoch=cfg.trainer.check_val_every_n_epoch,
        limit_train_batches=_batches(cfg.trainer.limit_train_batches),
        limit_val_batches=_batches(cfg.trainer.limit_val_batches),
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=cfg.trainer.deterministic,
        logger=loggers,
        callbacks=build_callbacks(cfg, task, run_dir / CHECKPOINT_DIR),
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=True,
    )
    return Run(cfg, run_dir, task, module, datamodule, trainer)


def compile_model(module: pl.LightningModule, mode: str) -> None:
    """torch.compile the network in place (``nn.Module.compile``: parameter names, and so checkpoints,
    stay unchanged). Barlow Twins: the backbone; segmentation: the whole segmenter."""
    target = getattr(module, "backbone", None) or getattr(module, "model")
    target.compile(mode=mode)


def evaluate(run: Run) -> dict:
    """Validation only (``--trainer.eval_only``): the metrics go to ``<run>/eval_metrics.yaml`` too."""
    import yaml

    results = run.trainer.validate(run.module, datamodule=run.datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    (run.run_dir / "eval_metrics.yaml").write_text(yaml.safe_dump(metrics, sort_keys=True))
    return metrics


def fit(run: Run) -> Run:
    if run.cfg.trainer.eval_only:
        try:
            evaluate(run)
        finally:
            _finish_wandb(exit_code=0)
        return run
    ckpt: Optional[str] = run.cfg.trainer.resume or None
    if ckpt:
        log.info("resuming from %s", ckpt)
    try:
        if not ckpt:
            tune(run)
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt)
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    _finish_wandb(exit_code=0)
    return run


def _finish_wandb(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")  # only if a logger imported it (wandb_mode=disabled needs no wandb)
    if wandb is not None and wandb.run is not None:  # several runs in one process (tests, sweeps) each need their own wandb run
        wandb.finish(exit_code=exit_code)


def run(cfg: Hparams) -> Run:
    return fit(build(cfg))
