"""vitssl entry point: ``python main.py [--config FILE.yaml] [--group.field=VALUE ...]`` (see --help)."""
from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence


def _one_line(err: BaseException) -> str:
    # Errors raised inside DataLoader workers arrive with the worker's traceback in the message:
    # the last line is the original message.
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    prefix = f"{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from config.loading import ConfigError, parse_config
    from config.validation import validate

    try:
        cfg = validate(parse_config(argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import trainer
    from callbacks.finite_loss import NonFiniteLossError
    from datamodules.images import DataError
    from models.weights import WeightLoadingError

    try:
        run = trainer.run(cfg)
    except (DataError, WeightLoadingError, NonFiniteLossError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    print(f"run directory: {run.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
