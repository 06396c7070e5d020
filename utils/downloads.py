"""Before a download: one quick connection attempt, so that a machine without network fails in seconds.

Libraries retry a failed download for a long time (huggingface_hub: 5 retries with back-off per file, about
30 s each; urllib: no timeout at all, minutes on an unroutable network) and then end in a long traceback.
:func:`connection_problem` opens one TCP connection to the download host, or to the proxy the environment
names for it (``https_proxy`` / ``http_proxy`` / ``no_proxy``, as urllib and huggingface_hub read them),
within :data:`PROBE_TIMEOUT_S` seconds; callers download only when it succeeds, and otherwise raise one line
naming the flag, the URL and the offline alternative.

Forcing offline (tests, air-gapped machines): ``https_proxy=http://127.0.0.1:9`` points every download at
a closed local port, so the probe fails at once and no library reaches the network.
"""
from __future__ import annotations

import socket
import threading
import urllib.request
from typing import Optional
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 5.0
"""Seconds one connection attempt (name lookup included) may take before the host counts as unreachable."""

DEFAULT_PORTS = {"http": 80, "https": 443}


def one_line(text: object, limit: int = 300) -> str:
    """``text`` (an exception or a string) as one line of at most ``limit`` characters: library messages
    can span several lines, and the CLI prints errors as a single line."""
    if isinstance(text, BaseException):
        text = str(text) or type(text).__name__
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 443)


def proxy_for(url: str) -> Optional[str]:
    """The proxy URL the environment sets for ``url`` (None when it goes direct)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _connect(host: str, port: int, timeout: float, outcome: list) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        outcome.append(None)
    except OSError as err:
        outcome.append(err.strerror or one_line(err))


def connection_problem(url: str, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when a TCP connection to the host of ``url`` (or to its proxy) opens within ``timeout``
    seconds; otherwise why not, as one line (e.g. 'cannot connect to host:443: Name or service not known')."""
    proxy = proxy_for(url)
    host, port = host_port(proxy or url)
    where = f"{host}:{port}" + (f" (the proxy set for {host_port(url)[0]})" if proxy else "")
    outcome: list = []
    # The name lookup ignores socket timeouts: run the attempt in a thread and stop waiting after timeout.
    worker = threading.Thread(target=_connect, args=(host, port, timeout, outcome), daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    if not outcome:
        return f"no answer from {where} within {timeout:g} s"
    return None if outcome[0] is None else f"cannot connect to {where}: {outcome[0]}"
