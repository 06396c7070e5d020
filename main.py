"""vitssl entry point: ``python main.py [--config FILE.yaml] [--group.field=VALUE ...]`` (see --help)."""
from __future__ import annotations

import errno
import logging
import os
import sys
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from utils.quiet import silence_known_noise  # local: the warning filters go in before any library loads

    silence_known_noise()  # libraries' tips and deprecations that concern neither the user nor this code
    # local: after the warning filters, so the libraries these import start quiet
    from config.loading import ConfigError, parse_config
    from config.validation import validate

    try:
        cfg = validate(parse_config(argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # local: torch and Lightning load only for a valid config (a config error is reported without them)
    import trainer
    from callbacks.checkpointing import CheckpointWriteError, NonFiniteStateError
    from callbacks.finite_loss import NonFiniteLossError
    from datamodules.images import DataError
    from models.weights import WeightLoadingError

    try:
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
    print(trainer.summary_line(run))
    print(f"run directory: {run.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
