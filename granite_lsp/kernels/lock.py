"""The kernel build's lock: one builder per cache directory, never a wait without end.

torch's own build lock (``lock`` in the build directory, taken by ``cpp_extension.load``) is a file
created with O_EXCL and removed when the build ends; a process killed while holding it (an editor
closed mid-compile) leaves it behind, and every later start waits on it forever. Ours is an
``flock`` on a file of its own: the kernel drops it when its owner dies, however it dies, so a dead
owner never blocks anyone, and whoever holds it knows that a torch ``lock`` beside it is stale (every
builder of the directory takes ours first). A live owner is waited for, up to a deadline, and then
named in the error (pid, host, how long it has held the lock).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows: the kernels are not built there (build.cpu_supported)
    fcntl = None  # type: ignore[assignment]

# How often a waiter looks at the lock again.
POLL_SECONDS = 0.25


class LockTimeout(RuntimeError):
    """Another live process held the build lock past the deadline."""


def describe_owner(path: Path) -> str:
    """Who wrote ``path`` (pid, host, age), as far as the file says; for messages only."""
    try:
        owner = json.loads(path.read_text())
        age = time.time() - float(owner["since"])
        return f"pid {owner['pid']} on {owner['host']}, for {age:.0f} s"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class BuildLock:
    """``with BuildLock(path, timeout):`` an exclusive lock on ``path`` (created if missing), or
    ``LockTimeout`` after ``timeout`` seconds of a live owner holding it."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while not self._try_lock(fd):
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"the kernel build lock {self.path} is held by {describe_owner(self.path)}; "
                        f"gave up after {self.timeout:g} s (GRANITE_LSP_KERNEL_LOCK_TIMEOUT)"
                    )
                time.sleep(POLL_SECONDS)
        except BaseException:
            os.close(fd)
            raise
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd

    @staticmethod
    def _try_lock(fd: int) -> bool:
        if fcntl is None:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (removing it would race a waiter)
            self._fd = None

    def __enter__(self) -> BuildLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
