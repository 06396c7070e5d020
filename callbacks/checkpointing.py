"""Crash-safe checkpoints: ``last.ckpt`` at every epoch end and every N steps, written atomically, never
with non-finite state, and one more when the run is stopped by SIGTERM or SIGINT.

Why not Lightning's ``ModelCheckpoint(save_top_k=0, save_last=True)``: from pytorch-lightning 2.6 on it
saves "last" only together with a top-k save, so a run killed before its end had nothing to resume from.
This callback owns ``last.ckpt`` and does not depend on that callback's semantics; ``ModelCheckpoint`` is
kept only for the best checkpoint by validation metric.

Atomic writes (:class:`AtomicCheckpointIO`, used for every checkpoint the trainer writes): the file is
written to a temporary name in the destination directory, flushed and fsynced, then ``os.replace``-d over
the old one and the directory fsynced. A kill at any moment or a full disk leaves the previous checkpoint
whole (Lightning's own ``_atomic_save`` moves a temporary file, which across filesystems is a copy).
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from utils.signals import received as startup_signal

log = logging.getLogger(__name__)

LAST = "last.ckpt"
TEMP_PREFIX = ".tmp-"  # temporary checkpoint files: ".tmp-<pid>-last.ckpt" beside their destination
# Metadata of our own in every checkpoint: which run wrote it (run_id), and at which point.
META_KEY = "vitssl"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only or vanished directory); the message is one
    line naming the file."""

    def __init__(self, code: Optional[int], message: str):
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return self.args[0]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that the file at ``path`` is always either the old one or the new one,
    complete. Raises :class:`CheckpointWriteError` (one line, naming the path) when the disk is full or the
    directory cannot be written; the temporary file is removed and the old checkpoint left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(err, OSError):
            code = err.errno
        elif isinstance(err, RuntimeError) and _disk_nearly_full(path.parent):
            code = errno.ENOSPC  # torch's zip writer reports a short write as RuntimeError("unexpected pos ...")
        else:
            raise
        reason = os.strerror(code) if code else str(err)
        hint = " (free some space or choose another --log.output_dir)" if code == errno.ENOSPC else ""
        raise CheckpointWriteError(code, f"cannot write checkpoint {path}: {reason}{hint}") from None


def _disk_nearly_full(directory: Path) -> bool:
    import shutil

    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of writes that were killed midway (never a complete checkpoint)."""
    for tmp in directory.glob(f"{TEMP_PREFIX}*"):
        try:
            pid = int(tmp.name[len(TEMP_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _process_alive(pid):
            try:
                tmp.unlink()
            except OSError:
                pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`atomic_torch_save` (every checkpoint: last, best, tuner's)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        atomic_torch_save(checkpoint, path)


def nonfinite_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
    """The name of the first parameter, buffer or optimizer state tensor holding NaN/inf, or None.
    One host sync per checkpoint (checkpoints are rare), none per step."""
    named: list[tuple[str, torch.Tensor]] = [(f"weight {n}", t) for n, t in pl_module.state_dict().items()]
    for i, optimizer in enumerate(trainer.optimizers):
        for slot, state in optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    named.append((f"optimizer {i} state {key!r}", value))
    floats = [(n, t) for n, t in named if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).cpu()
    bad = (~finite).nonzero()
    return floats[int(bad[0])][0] if len(bad) else None


class NonFiniteStateError(RuntimeError):
    """Weights or optimizer state became NaN/inf; no checkpoint of that state was written."""


class RunCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` at every training epoch end, every ``every_n_steps`` optimizer steps
    (0 = off), and when the run is stopped by SIGTERM/SIGINT (:class:`StopOnSignal` turns both into
    Lightning's graceful stop). Before each write, the CSV metrics are flushed (so that ``metrics.csv`` holds
    every row of the steps the checkpoint covers) and the state is checked for NaN/inf: a non-finite state
    stops the run with :class:`NonFiniteStateError` naming the last good checkpoint, which stays untouched.

    As a :class:`~pytorch_lightning.callbacks.Checkpoint`, its epoch-end hook runs after every other
    callback's and the module's, so the checkpoint holds their epoch-end state.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 0, run_meta: Optional[dict] = None):
        self.dirpath = Path(dirpath)
        self.every_n_steps = max(0, int(every_n_steps))
        self.run_meta = dict(run_meta or {})
        self.last_good: Optional[Path] = None  # the last checkpoint this run wrote (or resumed from)
        self.last_good_step: Optional[int] = None
        self._saved_at_step: Optional[int] = None
        self._flush_pending = False
        self._saving_epoch_end = False

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.dirpath)
        if trainer.ckpt_path and Path(trainer.ckpt_path).is_file():
            self.last_good = Path(trainer.ckpt_path)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.last_good is not None:  # resumed: the state just restored is the checkpoint's
            self.last_good_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every_n_steps or trainer.global_step % self.every_n_steps:
            return
        # The last batch of an epoch is followed by the epoch-end checkpoint (after validation): skip it.
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        self.save(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._saving_epoch_end = True
        try:
            self.save(trainer, pl_module)
        finally:
            self._saving_epoch_end = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # The epoch-level metrics of the previous epoch were logged after its checkpoint: write them now.
        flush_csv(trainer)
        self._flush_pending = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The training row of the step a step checkpoint covers is logged just after the checkpoint: write it
        # now, so that a kill later loses no row of a step the checkpoint holds.
        if self._flush_pending:
            flush_csv(trainer)
            self._flush_pending = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # SIGTERM/SIGINT: Lightning raises SIGTERMException at the next step or epoch boundary (a consistent
        # state); keep that state. Any other exception may come from the middle of a step: never saved.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and not trainer.sanity_checking:
            if self._saved_at_step == trainer.global_step and self.last_path.is_file():
                return  # the state of this very step is already on disk
            if self.last_good is not None and self.last_good_step == trainer.global_step:
                return  # stopped before the first step of a resumed run: its checkpoint holds this very state
            if trainer.global_step == 0 and self.last_good is None:
                return  # stopped before the first step of a new run: nothing to keep (resume auto starts it over)
            try:
                self.save(trainer, pl_module)
            except (NonFiniteStateError, CheckpointWriteError) as err:
                log.error("no checkpoint written on stop: %s", err)

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the step interval is the current config's

    # -- saving ------------------------------------------------------------------------------------
    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        bad = nonfinite_state(trainer, pl_module)
        if bad is not None:
            where = (f"{self.last_good} (step {self.last_good_step})" if self.last_good_step is not None
                     else str(self.last_good) if self.last_good else "(none: no finite state was saved yet)")
            raise NonFiniteStateError(
                f"{bad} became non-finite (NaN/inf) by step {trainer.global_step}; no checkpoint of it was "
                f"written. The last good checkpoint is {where}. Try a lower --optim.lr, "
                f"--trainer.gradient_clip_val, a larger --data.batch_size, or --trainer.precision=32-true.")
        if self._saving_epoch_end:
            write_epoch_metrics(trainer)
        flush_csv(trainer)
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self._saved_at_step = trainer.global_step
        self._flush_pending = True
        self.last_good, self.last_good_step = self.last_path, trainer.global_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Where in the run this state is, checked by a resume against its config (config/resume.py:
        # check_continuity): after an epoch end every batch of that epoch is done; else the epoch is in progress.
        progress = trainer.fit_loop.epoch_loop.batch_progress
        # this callback's epoch-end save, or the best checkpoint's (saved in the same hook, just before)
        at_epoch_end = self._saving_epoch_end or (bool(progress.is_last_batch) and trainer.training
                                                  and not trainer.validating)
        batches = int(progress.current.processed)  # "completed" counts the current batch only after its hooks
        checkpoint[META_KEY] = {**self.run_meta, "global_step": trainer.global_step,
                                "epoch": trainer.current_epoch,
                                "epochs_completed": trainer.current_epoch + (1 if at_epoch_end else 0),
                                "batches_into_epoch": 0 if at_epoch_end else batches}


class BestCheckpoint(ModelCheckpoint):
    """``best-*.ckpt``: Lightning's ``ModelCheckpoint`` (top 1 by the task's validation metric), made right
    across resumes.

    - It must come before :class:`RunCheckpoint` in the callback list (both save in the epoch-end hook, in
      list order): ``last.ckpt`` then holds the best state *including* the epoch that just ended. In the
      other order a resumed run started from the previous epoch's best and kept a worse checkpoint as best.
    - A best checkpoint written after the state a run resumes from (the process died between the two
      writes, or the run was rewound) is not in the restored state: it is removed when training starts,
      and written again if the resumed run finds it best again. Only ``best-*.ckpt`` files are touched.
    - A moved run directory keeps its best state (Lightning drops it when the directory differs): the
      recorded paths are mapped into the new ``checkpoints/`` by file name.
    """

    PREFIX = "best-"

    def __init__(self, dirpath: str | Path, monitor: str, mode: str):
        super().__init__(dirpath=str(dirpath), monitor=monitor, mode=mode, save_top_k=1,
                         filename=self.PREFIX + "e{epoch:03d}-s{step}", auto_insert_metric_name=False)
        self._restored = False

    @property
    def state_key(self) -> str:
        # Lightning's key ("ModelCheckpoint{...}") so that checkpoints written before this class load into it.
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        old = state.get("dirpath")
        if old and self.dirpath and Path(old) != Path(self.dirpath):
            def moved(path: Any) -> Any:
                return str(Path(self.dirpath) / Path(path).name) if isinstance(path, str) and path else path

            state["dirpath"] = self.dirpath
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state:
                    state[key] = moved(state[key])
            state["best_k_models"] = {moved(k): v for k, v in (state.get("best_k_models") or {}).items()}
        super().load_state_dict(state)
        self._restored = True

    def on_fit_start(self, trainer, pl_module) -> None:
        if not (self._restored and trainer.is_global_zero and self.dirpath):
            return
        keep = {Path(p).name for p in self.best_k_models}
        for path in Path(self.dirpath).glob(f"{self.PREFIX}*.ckpt"):
            if path.name not in keep:
                log.info("removing %s: written after the checkpoint this run resumes from", path)
                try:
                    path.unlink()
                except OSError:
                    pass

    def best_checkpoint(self) -> Optional[tuple[float, Path]]:
        """(score, path) of the best checkpoint on disk, or None."""
        if self.best_model_score is None or not self.best_model_path:
            return None
        path = Path(self.best_model_path)
        return (float(self.best_model_score), path) if path.is_file() else None


def write_epoch_metrics(trainer: pl.Trainer) -> None:
    """Send the metrics logged for the ending training epoch (epoch means, epoch-end scores) to the loggers now.

    Lightning sends them after every epoch-end hook, so after the epoch-end checkpoint: a kill -9 in between
    left a checkpoint that says the epoch is done and a metrics.csv without its epoch row, and the resumed run
    never writes it. This is what the fit loop does then (pytorch-lightning 2.6 ``_FitLoop.on_advance_end``:
    logged at the epoch's last step, the results reset); the fit loop then finds nothing left to send."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or trainer.sanity_checking:
        return
    epoch_loop = trainer.fit_loop.epoch_loop
    # reading them first keeps the epoch's values in trainer.callback_metrics / progress_bar_metrics, which the
    # reset below would otherwise drop before later hooks (and the caller of fit) could read them
    _ = connector.callback_metrics, connector.progress_bar_metrics
    epoch_loop._batches_that_stepped -= 1
    try:
        connector.update_train_epoch_metrics()
    finally:
        epoch_loop._batches_that_stepped += 1


def flush_csv(trainer: pl.Trainer) -> None:
    """Write buffered CSV rows now (Lightning's CSV logger buffers up to ``flush_logs_every_n_steps``)."""
    from pytorch_lightning.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and trainer.is_global_zero:
            logger.save()


# -- signals -------------------------------------------------------------------------------------------

class StopOnSignal(pl.Callback):
    """SIGTERM (schedulers, preemption) and SIGINT (Ctrl-C) stop training at the next step boundary with a
    checkpoint of that step (see :class:`RunCheckpoint`), and the process exits 143 / 130.

    Lightning already turns SIGTERM into a graceful stop (``SIGTERMException`` at the next step), but exits
    0; SIGINT it turns into a ``KeyboardInterrupt`` wherever it lands (possibly mid-step) and saves nothing.
    Here SIGINT takes the SIGTERM path; a second SIGINT interrupts at once. ``received`` holds the first
    signal's number for the exit status."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._trainer: Optional[pl.Trainer] = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self._trainer is None or self._trainer.state.status != pl.trainer.states.TrainerStatus.RUNNING:
            # No fit to stop: Lightning's teardown puts this handler back after a failed fit or a tuner run (it
            # restores what it found). The signal then does what it does without us: Ctrl-C interrupts at once.
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        if self.received is None:
            self.received = signum
            log.warning("received %s: stopping at the next step with a checkpoint", signal.Signals(signum).name)
        if self._trainer is not None:
            if self._trainer.validating and not self._trainer.sanity_checking:
                # Lightning would stop in the middle of validation, and a checkpoint of that state resumes
                # without the epoch's validation: stop after it (at the epoch end, with its checkpoint).
                # (For SIGTERM, Lightning's own handler runs just before this one and has set the flag: unset.)
                self._stop_after_validation = True
                self._trainer._signal_connector.received_sigterm = False
            else:
                self._trainer._signal_connector.received_sigterm = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if getattr(self, "_stop_after_validation", False):
            self._stop_after_validation = False
            trainer._signal_connector.received_sigterm = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)
        if startup_signal() is not None and self.received is None:
            # received during start-up (utils/signals.py), after its last safe point: stop before the first step
            self._handler(startup_signal(), None)

    def on_train_start(self, trainer, pl_module) -> None:
        # A signal received before training started (during start-up, setup or the checkpoint's restore) stops
        # the run now: Lightning itself would only look after the first training step.
        if self.received is not None:
            raise SIGTERMException()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            # Lightning restores its own handlers in its teardown; put ours back only if still installed.
            if signal.getsignal(signum) == self._handler:
                try:
                    signal.signal(signum, handler)
                except (TypeError, ValueError):
                    pass
        self._previous = {}
        self._trainer = None
