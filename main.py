"""vitssl entry point: ``python main.py [--config FILE.yaml] [--group.field=VALUE ...]`` (see --help)."""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence


# A full disk, a quota, a read-only file system or folder: the user's situation, reported in one line.
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if "Original Traceback" not in text:  # our errors are one line; join any library line breaks
        return " ".join(text.split()) or type(err).__name__
    # Re-raised from a DataLoader worker: the last line is "<module>.<Class>: <original message>".
    last = text.splitlines()[-1]
    cls = type(err)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def dry_run(cfg) -> str:
    """``--dry-run``: build what the run would train and on what, without a run directory, a logger or a step:
    the weights and data are loaded and checked (a synthetic set is generated into its cache if missing),
    then a few lines say what the run would be."""
    # local: torch and Lightning load only for a valid config (a config error is reported without them)
    import pytorch_lightning as pl
    import trainer
    from config.loading import to_dict
    from config.resume import read_checkpoint
    from lightningmodules import TASKS

    task = TASKS.get(cfg.task)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = task.module(to_dict(cfg))
    if cfg.trainer.resume:
        trainer.check_checkpoint_fits(module, read_checkpoint(Path(cfg.trainer.resume)), cfg.trainer.resume)
    datamodule = task.datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    world = cfg.trainer.devices * cfg.trainer.num_nodes if isinstance(cfg.trainer.devices, int) else 1
    per_epoch = len(loader) // max(world, 1)
    limit = cfg.trainer.limit_train_batches
    per_epoch = min(per_epoch, int(limit)) if limit > 1 else int(per_epoch * limit)
    steps = per_epoch * cfg.trainer.max_epochs
    if cfg.trainer.max_steps > 0:
        steps = min(steps, cfg.trainer.max_steps)
    params = list(module.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    parts = ", ".join(f"{name} {_count(sum(p.numel() for p in child.parameters()))}"
                      for name, child in module.named_children() if any(True for _ in child.parameters()))
    images = len(getattr(loader, "dataset", ()))
    return "\n".join([
        f"task {cfg.task}: {_count(total)} parameters, {_count(trainable)} trainable ({parts})",
        f"training data: {images} images, batch {cfg.data.batch_size}"
        + (f" on each of {world} processes" if world > 1 else "")
        + f": {per_epoch} steps per epoch, {steps} optimizer steps in all"
        + (f" (--trainer.max_steps {cfg.trainer.max_steps})" if 0 < cfg.trainer.max_steps < per_epoch * cfg.trainer.max_epochs
           else f" ({cfg.trainer.max_epochs} epochs)"),
        f"dry run: config, weights and data are usable; nothing was written (drop --dry-run to train; "
        f"{'resuming ' + cfg.trainer.resume if cfg.trainer.resume else 'a new run under ' + cfg.log.output_dir + '/'})",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    from utils.signals import startup_signals  # local: plain python, installed before any heavy import

    with startup_signals():  # SIGTERM/SIGINT during start-up: exit 143/130 at the next safe point, one line
        return _main(argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from utils.quiet import silence_known_noise  # local: the warning filters go in before any library loads

    silence_known_noise()  # libraries' tips and deprecations that concern neither the user nor this code
    # local: after the warning filters, so the libraries these import start quiet
    from config.loading import ConfigError, chosen_actions, format_config, parse_config
    from config.validation import validate

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = validate(parse_config(argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    actions = chosen_actions(argv)
    if "--print-config" in actions:
        print(format_config(cfg), end="")
        return 0
    from utils.console import quiet_console  # local: plain python, after the config is known (--log.verbose)

    quiet = quiet_console(cfg)  # not a terminal: no progress bars, known notices and wandb's banner (utils/console.py)

    # local: torch and Lightning load only for a valid config (a config error is reported without them)
    import trainer
    from callbacks.checkpointing import CheckpointWriteError, NonFiniteStateError
    from callbacks.finite_loss import NonFiniteLossError
    from datamodules.images import DataError
    from models.weights import WeightLoadingError

    try:
        if "--dry-run" in actions:
            print(dry_run(cfg))
            return 0
        run = trainer.run(cfg)
    except ConfigError as err:  # found while building: a resumed checkpoint that does not fit, an unwritable directory
        print(f"error: {err}", file=sys.stderr)
        return 2
    except trainer.RunStopped as err:
        print(f"{err}", file=sys.stderr)
        return 128 + int(err.signum)  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    except (DataError, WeightLoadingError, NonFiniteLossError, NonFiniteStateError, CheckpointWriteError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            raise
        # a full disk or a read-only folder is the user's situation, not a bug: one line naming the file
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot write{where}: {os.strerror(err.errno)}", file=sys.stderr)
        return 1
    # Lightning keeps checkpoint paths absolute: every path of the last lines is shown one way, relative to the
    # working directory when the run is under it
    shown = _shown_path(run.run_dir)
    print(trainer.summary_line(run).replace(str(Path(run.run_dir).resolve()), shown))
    print(f"run directory: {shown}")
    if quiet and any((Path(run.run_dir) / "wandb").glob("offline-run-*")):
        print(f"wandb: logged offline; upload with: wandb sync {shown}/wandb/offline-run-*")
    return 0


def _shown_path(path) -> str:
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(resolved)


if __name__ == "__main__":
    sys.exit(main())
