"""Give freed memory back to the operating system after big transient allocations.

glibc serves blocks below its (adaptive, up to 32 MB) mmap threshold from the heap, and a heap
keeps freed memory: loading the weights (converted piece by piece) and a long prefill (hundreds of MB
of activations) each left a few hundred MB resident. Pinning the threshold low instead halved prefill
speed (every large temporary became a fresh mapping, faulted in page by page). So allocations stay as
they are, and ``release()`` trims the heap after the events that leave garbage: a model load and a
prefill of many tokens. Trimming costs a few ms and only the next such event pays for the pages again.
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
