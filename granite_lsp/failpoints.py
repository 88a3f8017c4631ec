"""Deliberate faults for reliability tests, armed only through the environment (or ``arm``).

``GRANITE_LSP_FAILPOINTS="complete:2,worker-crash:1"`` makes the next 2 completion jobs raise and
the next job after that kill the model worker thread; ``forward-midway`` fails a model forward
halfway through its layers, after half of the state has advanced (as running out of memory there
would); ``slow-token`` makes each generated token take 30 ms longer (a slow machine). Tests use them
to check that the real server, in its own process, survives what cannot be provoked from outside on
demand; nothing is armed in normal use, and each check is a dict lookup.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

_lock = threading.Lock()
_armed: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """An ordinary exception raised on purpose (``complete``)."""


class WorkerCrash(BaseException):
    """Escapes ``except Exception`` on purpose (``worker-crash``), like a fatal error in a thread."""


def _parse(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        out[name] = int(count) if count.isdigit() else 1
    return out


_armed.update(_parse(os.environ.get("GRANITE_LSP_FAILPOINTS", "")))


def arm(name: str, count: int = 1) -> None:
    """Arm ``name`` for the next ``count`` hits (in-process tests; the server reads the environment)."""
    with _lock:
        _armed[name] = count


def armed(name: str) -> bool:
    """Whether ``name`` would fire on its next hit (lets a fast path that skips the hit step aside)."""
    return bool(_armed) and _armed.get(name, 0) > 0


def fire(name: str) -> bool:
    """True (once per armed count) when failpoint ``name`` should fail now."""
    if not _armed:
        return False
    with _lock:
        left = _armed.get(name, 0)
        if left <= 0:
            return False
        _armed[name] = left - 1
    log.warning("failpoint %s fired", name)
    return True
