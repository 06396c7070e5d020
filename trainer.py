"""Builds the LightningModule, DataModule, loggers, callbacks and Lightning Trainer from a config, and runs it."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar

from callbacks import visualisation_callbacks
from callbacks.baselines import build_baselines, summary_note
from callbacks.checkpointing import AtomicCheckpointIO, BestCheckpoint, RunCheckpoint, StopOnSignal
from callbacks.epoch_timer import EpochTimer
from callbacks.finite_loss import FiniteLossGuard
from callbacks.model_summary import RunModelSummary
from callbacks.rng_state import RNGStateCheckpoint
from config.hparams import Hparams
from config.loading import ConfigError, save_config, to_dict
from config.resume import CHECKPOINT_DIR, check_continuity, read_checkpoint, run_finished, saved_checkpoints
from datamodules.images import DataError
from lightningmodules import TASKS, Task
from models.weights import WeightLoadingError
from utils.console import show_progress_bar
from utils.loggers import RunCSVLogger, RunTensorBoardLogger, build_wandb_logger, effective_wandb_mode
from utils.optim import lr_scaling_note
from utils.run_dir import global_rank, prepare_run_dir, release_run_locks, run_meta
from utils.signals import received as startup_signal
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


def _batches(value: float) -> float | int | None:
    """Lightning reads an int as a number of batches and a float as a fraction; None (= all) for 1, which
    Lightning would otherwise announce in an info line on every run."""
    if value == 1:
        return None
    return int(value) if value > 1 else float(value)


def build_callbacks(cfg: Hparams, task: Task, ckpt_dir: Path, meta: Optional[dict] = None) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = [
        FiniteLossGuard(cfg.trainer.finite_check_every_n_steps),
        RNGStateCheckpoint(),
        EpochTimer(),
        StopOnSignal(),
    ]
    if cfg.trainer.limit_val_batches > 0:
        # Before RunCheckpoint: both save at the epoch end in list order, and last.ckpt must hold the best
        # state including the epoch that just ended (see BestCheckpoint).
        callbacks.append(BestCheckpoint(ckpt_dir, monitor=task.monitor, mode=task.mode))
    callbacks += [
        # last.ckpt at every epoch end, every checkpoint_every_n_steps and on SIGTERM/SIGINT (atomic, finite).
        RunCheckpoint(ckpt_dir, every_n_steps=cfg.trainer.checkpoint_every_n_steps, run_meta=meta),
        LearningRateMonitor(logging_interval="step"),
    ]
    callbacks += visualisation_callbacks(cfg)
    callbacks += build_baselines(cfg)  # --segmentation.baselines: references trained in the same run
    if show_progress_bar(cfg):  # a terminal only, unless --log.verbose (utils/console.py)
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.trainer.progress_refresh_rate))
    return callbacks


def _filled_at_setup(module: pl.LightningModule) -> set[str]:
    """Buffers the module declares empty and fills only in ``setup`` from the data, under its config: the class
    weights of ``--segmentation.class_weighting median_frequency`` (``criterion.weight``). A checkpoint holds
    them, a freshly built module not yet; Lightning loads the checkpoint's values after setup (shape checked)."""
    cfg = getattr(module, "cfg", None)
    segmentation = getattr(cfg, "segmentation", None)
    if getattr(cfg, "task", None) != "segmentation" or getattr(segmentation, "class_weighting", "none") == "none":
        return set()
    try:
        criterion = module.get_submodule("criterion")
    except AttributeError:
        return set()
    return {"criterion.weight"} if "weight" in criterion._buffers else set()


def check_checkpoint_fits(module: pl.LightningModule, ckpt: dict, path: str) -> None:
    """A resumed checkpoint must hold exactly the module's tensors, with the same shapes: else the config
    describes another architecture (e.g. a changed --backbone.depth) and nothing may be written."""
    theirs = ckpt.get("state_dict", {})
    ours = module.state_dict()
    later = _filled_at_setup(module)
    missing = [k for k in ours if k not in theirs] + [k for k in sorted(later) if k not in theirs]
    extra = [k for k in theirs if k not in ours and k not in later]
    shapes = [k for k in ours if k in theirs and tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if missing or extra or shapes:
        detail = (f"{shapes[0]} is {tuple(theirs[shapes[0]].shape)} there, {tuple(ours[shapes[0]].shape)} here"
                  if shapes else f"{len(missing)} tensors missing there (e.g. {(missing or ['-'])[0]}), "
                                 f"{len(extra)} unexpected (e.g. {(extra or ['-'])[0]})")
        raise ConfigError(f"--trainer.resume: {path} holds another architecture than this config ({detail}); "
                          f"resume with the run's own settings (drop the changed --backbone/--barlow/--segmentation "
                          f"flags) or start a new run")


def build(cfg: Hparams) -> Run:
    """Everything a run needs, from a validated config. Everything that can fail because of the user's input
    (weights, data, a checkpoint that does not fit) is checked before the run directory is written."""
    task = TASKS.get(cfg.task)
    pl.seed_everything(cfg.seed, workers=True)
    resumed = bool(cfg.trainer.resume)
    ckpt = read_checkpoint(Path(cfg.trainer.resume)) if resumed else None
    if ckpt is not None:
        check_continuity(cfg, Path(cfg.trainer.resume), ckpt)
    cfg.trainer.allow_rewind = False  # for this command only: never stored in config.yaml

    module = task.module(to_dict(cfg))  # loads --backbone.weights etc.: a bad file fails here, nothing written yet
    if ckpt is not None:
        check_checkpoint_fits(module, ckpt, cfg.trainer.resume)
    datamodule = task.datamodule(cfg)
    if global_rank() == 0 and not cfg.trainer.eval_only:
        datamodule.prepare_data()  # a missing data set fails before the run directory exists; Lightning's call is then a no-op

    run_dir = prepare_run_dir(cfg, resumed=resumed)  # first takes the run's lock: one process per run
    if global_rank() == 0:
        # after the checkpoint was read and matched; the comment on top states the effective peak lr
        save_config(cfg, run_dir / "config.yaml", comment=lr_scaling_note(cfg))

    # rows logged after the checkpoint are redone by this run and dropped first; a finished run trains nothing
    resume_step = int(ckpt.get("global_step", 0)) if ckpt is not None and not run_finished(cfg, ckpt) else None
    loggers: list = [RunCSVLogger(run_dir, resume_step=resume_step)]
    wandb_mode = effective_wandb_mode(cfg)
    if wandb_mode != "disabled":
        loggers.append(build_wandb_logger(cfg, run_dir, wandb_mode))
    if cfg.log.tensorboard:
        loggers.append(RunTensorBoardLogger(run_dir))

    if cfg.trainer.compile:
        compile_model(module, cfg.trainer.compile_mode)
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
        # 1 (all batches) goes as None, Lightning's default: the same, without its "100% of the batches" lines
        limit_train_batches=_batches(cfg.trainer.limit_train_batches),
        limit_val_batches=_batches(cfg.trainer.limit_val_batches),
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=cfg.trainer.deterministic,
        logger=loggers,
        callbacks=build_callbacks(cfg, task, run_dir / CHECKPOINT_DIR, run_meta(run_dir, cfg)) + [RunModelSummary()],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=show_progress_bar(cfg),
        enable_model_summary=False,  # RunModelSummary above replaces Lightning's (callbacks/model_summary.py)
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


def summary_line(run: Run) -> str:
    """One line at the end of a run: its best monitored value, where, and the checkpoint holding it
    (segmentation: ``best val/mIoU 0.412 at epoch 7, checkpoint runs/x/checkpoints/best-e007-s96.ckpt``)."""
    if run.cfg.trainer.eval_only:
        return f"evaluated: metrics in {run.run_dir / 'eval_metrics.yaml'}"
    best_callback = next((c for c in run.trainer.callbacks if isinstance(c, BestCheckpoint)), None)
    best = best_callback.best_checkpoint() if best_callback is not None else None
    if best is None:
        return f"finished at step {run.trainer.global_step}, checkpoint {run.run_dir / CHECKPOINT_DIR / 'last.ckpt'}"
    score, path = best
    epoch = path.stem.split("-")[1].lstrip("e") if "-e" in path.name else "?"
    return (f"best {best_callback.monitor} {score:.4f} at epoch {int(epoch) if epoch.isdigit() else epoch}"
            f"{summary_note(run.trainer)}, checkpoint {path}")


class RunStopped(Exception):
    """Training was stopped by SIGTERM/SIGINT after writing a checkpoint of the current step."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def _stopped(run: Run) -> RunStopped:
    import signal

    stop = next((c for c in run.trainer.callbacks if isinstance(c, StopOnSignal)), None)
    ckpt = next((c for c in run.trainer.callbacks if isinstance(c, RunCheckpoint)), None)
    signum = (stop.received if stop is not None and stop.received else None) or startup_signal() or signal.SIGTERM
    saved = ckpt.last_good if ckpt is not None and ckpt.last_good_step == run.trainer.global_step else None
    if saved is None and not saved_checkpoints(run.run_dir):
        return _stopped_at_startup(signum, run.run_dir)
    where = (f"checkpoint {saved} (step {run.trainer.global_step}); continue with: python main.py "
             f"--trainer.resume {run.run_dir}" if saved else "no checkpoint of this step was written")
    return RunStopped(signum, f"stopped by {signal.Signals(signum).name} at step {run.trainer.global_step}: {where}")


def _stopped_at_startup(signum: int, run_dir: Optional[Path]) -> RunStopped:
    """Stopped before the first training step: there is nothing to keep, and the run can start again."""
    import signal

    again = (f"the same command with --trainer.resume auto --log.run_name {run_dir.name} starts it over in {run_dir}"
             if run_dir is not None else "nothing was written")
    return RunStopped(signum, f"stopped by {signal.Signals(signum).name} during start-up, before the first "
                              f"training step: {again}")


def _stop_if_signalled(run_dir: Optional[Path]) -> None:
    """The safe points of start-up: a SIGTERM/SIGINT received before ends the run here (utils/signals.py)."""
    signum = startup_signal()
    if signum is not None:
        raise _stopped_at_startup(signum, run_dir)


def fit(run: Run) -> Run:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

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
        _stop_if_signalled(run.run_dir)
        if not ckpt:
            tune(run)
        _stop_if_signalled(run.run_dir)
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt)
    except SIGTERMException:
        _finish_wandb(exit_code=1)
        raise _stopped(run) from None
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    _finish_wandb(exit_code=0)
    return run


def _finish_wandb(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")  # only if a logger imported it (wandb_mode=disabled needs no wandb)
    if wandb is not None and wandb.run is not None:  # several runs in one process (tests, sweeps) each need their own wandb run
        wandb.finish(exit_code=exit_code)


def _remove_if_nothing_to_keep(run_dir: Path) -> None:
    """A new run that failed on the user's input before its first checkpoint leaves no directory behind."""
    import shutil

    if not saved_checkpoints(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def run(cfg: Hparams) -> Run:
    try:
        _stop_if_signalled(None)
        built = build(cfg)
        try:
            return fit(built)
        except RunStopped:
            _finish_wandb(exit_code=1)
            raise
        except (DataError, WeightLoadingError) as err:
            if not cfg.trainer.resume and global_rank() == 0:
                _finish_wandb(exit_code=1)
                _remove_if_nothing_to_keep(built.run_dir)
            raise
    finally:
        release_run_locks()  # the run is over in this process (a process ending drops it anyway)
