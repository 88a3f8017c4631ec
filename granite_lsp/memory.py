"""Give freed memory back to the operating system after big transient allocations.

glibc serves blocks below its (adaptive, up to 32 MB) mmap threshold from the heap, and a heap
keeps freed memory: loading the weights (converted piece by piece) and a long prefill (hundreds of MB
of activations) each left a few hundred MB resident. Pinning the threshold low instead halved prefill
speed (every large temporary became a fresh mapping, faulted in page by page). So allocations stay as
they are, and ``release()`` trims the heap after the events that leave garbage: a model load and a
prefill of many tokens. Trimming costs a few ms and only the next such event pays for the pages again.

``LEDGER`` records the process's resident memory at each stage of a server's life (started, modules
imported, kernels, tokenizer, weights, first completion) and its peak while serving, for
``granite/stats`` and the bench's split of the RSS into interpreter + libraries, weights, state cache
and the rest.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

log = logging.getLogger(__name__)


@cache
def _malloc_trim() -> Callable[[int], Any] | None:  # glibc's, through ctypes
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None


def release() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# -- what the process holds, stage by stage ---------------------------------------------------------

_MB = 1 / 1024.0  # /proc reports kB


def resident() -> dict[str, float]:
    """This process's memory now, in MB, from /proc (empty where /proc cannot tell: not Linux):
    ``rss`` (VmRSS), ``anon`` (anonymous pages: heap, tensors), ``file`` (mapped files: shared
    libraries, mostly shared with other processes) and ``peak`` (VmHWM: the most ``rss`` has been
    since the process started or since ``Ledger.ready`` reset it)."""
    names = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in names:
                    out[names[key]] = int(value.split()[0]) * _MB
    except (OSError, ValueError, IndexError):
        return {}
    return out


class Ledger:
    """The server's resident memory at each stage of its life (``mark``), so that what lies above the
    weights and the state cache can be told apart: the interpreter and libraries (``imported``), the
    kernels, the tokenizer, the weights, the first completion. ``ready`` (the model loaded) keeps the
    load's peak and resets the kernel's peak counter (VmHWM, through /proc/self/clear_refs), so that
    ``peak`` afterwards is the serving peak alone: loading converts weights piece by piece and peaks
    above anything serving does, which says nothing about a session with background work on."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.load_peak_mb: float | None = None
        self.peak_reset = False

    def mark(self, stage: str, once: bool = False) -> None:
        """Record the memory now as ``stage`` (``once``: only the first time)."""
        if once and stage in self.stages:
            return
        now = resident()
        if now:
            self.stages[stage] = now

    def ready(self) -> None:
        """The model is loaded: record it, keep the load's peak, restart the peak counter."""
        self.mark("ready")
        self.load_peak_mb = max(self.load_peak_mb or 0.0, self.stages.get("ready", {}).get("peak", 0.0)) or None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "reset the peak resident set size" (Linux >= 4.0)
            self.peak_reset = True
        except OSError:
            self.peak_reset = False

    def as_dict(self) -> dict[str, object]:
        """For ``granite/stats``: the stages, the load's peak, and now (``peak``: since ``ready`` when
        ``peak_reset``, since the process started otherwise)."""
        return {
            "stages": dict(self.stages),
            "load_peak_mb": self.load_peak_mb,
            "peak_reset": self.peak_reset,
            "now": resident(),
        }


LEDGER = Ledger()  # one process, one ledger
