"""Exit when the editor that started us is gone (LSP: initialize's ``processId``).

The id comes from the client and is checked before use: ``os.kill`` with a negative id signals a
whole process group (a negative processId made the server exit), and one beyond the platform's range
raised inside the watcher task, which then died silently (client death never noticed again). Liveness
is asked without signals: on Windows ``os.kill(pid, 0)`` does not probe, it *terminates* the process,
so there the process is opened and its exit code read instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_PID = 2**31 - 1 if sys.platform != "win32" else 2**32 - 1  # pid_t / DWORD
POLL_SECONDS = 1.0
_watching: set[asyncio.Task[None]] = set()


def valid_pid(pid: object) -> int | None:
    """``pid`` when it can name a process here, else None (with a warning saying why it is ignored)."""
    if pid is None:
        return None
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= MAX_PID:
        log.warning("initialize: processId %r is not a valid process id; not watching the client process", pid)
        return None
    return pid


def _alive_posix(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's process
    return True


if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    def _alive_windows(pid: int) -> bool:
        synchronize, wait_timeout, access_denied = 0x00100000, 0x102, 5
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = wintypes.HANDLE
        handle = kernel32.OpenProcess(synchronize, False, pid)
        if not handle:
            return bool(ctypes.get_last_error() == access_denied)  # it exists, but is not ours to open
        try:
            return bool(kernel32.WaitForSingleObject(handle, 0) == wait_timeout)  # running: not signalled
        finally:
            kernel32.CloseHandle(handle)


def alive(pid: int) -> bool:
    """Whether process ``pid`` (already validated) still exists."""
    if sys.platform == "win32":
        return _alive_windows(pid)
    return _alive_posix(pid)


def watch(process_id: object, on_gone: Callable[[], None] | None = None) -> asyncio.Task[None] | None:
    """Start watching the client's process (on the running loop); None when there is nothing to watch."""
    pid = valid_pid(process_id)
    if pid is None:
        return None
    task = asyncio.get_running_loop().create_task(_watch(pid, on_gone or _exit), name=f"watch client {pid}")
    _watching.add(task)  # the loop holds tasks weakly: without this the watch could be collected
    task.add_done_callback(_watching.discard)
    return task


async def _watch(pid: int, on_gone: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(POLL_SECONDS)
        try:
            gone = not alive(pid)
        except Exception as e:  # keep watching: one failed probe must not end the watch for good
            log.warning("checking client process %s failed: %s", pid, e)
            continue
        if gone:
            log.warning("client process %s is gone; exiting", pid)
            on_gone()
            return


def _exit() -> None:
    logging.shutdown()
    os._exit(0)
