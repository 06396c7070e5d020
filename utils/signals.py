"""SIGTERM and SIGINT during start-up (before training takes over their handling).

From the moment ``main.py`` starts until Lightning's fit installs ``callbacks.checkpointing.StopOnSignal``, a
preemption (SIGTERM) or a Ctrl-C (SIGINT) is recorded here instead of killing the process wherever it is
(a half-written file, a traceback from deep inside an import). The run then stops at the next safe point
(``trainer.run``: before building, before training; ``StopOnSignal``: before the first training step) with
exit status 128 + N and one line. Nothing it wrote needs keeping: ``--trainer.resume auto`` starts such a run
over in its directory (``utils.run_dir.restart_in_place``). A second SIGINT interrupts at once.

Plain python: no torch import (it is installed before the heavy imports start).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: Optional[int] = None


def _record(signum: int, frame: Any) -> None:
    global _received
    if signum == signal.SIGINT and _received is not None:
        raise KeyboardInterrupt  # asked twice: stop now
    if _received is None:
        _received = signum
        log.warning("received %s during start-up: stopping before training starts", signal.Signals(signum).name)


def received() -> Optional[int]:
    """The first SIGTERM/SIGINT received during start-up (its number), or None."""
    return _received


@contextlib.contextmanager
def startup_signals() -> Iterator[None]:
    """Record SIGTERM/SIGINT while the block runs (main.py's whole run; training replaces the handlers with
    its own and puts these back afterwards); the previous handlers are restored at the end."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(signum, handler)
        _received = None
