"""One model worker thread, fed latest-wins per document.

The LSP loop must never wait on the model (edits keep arriving while a suggestion is generated), and an
editor fires a request per keystroke, most of them obsolete by the time the model is free. So:
- every request for a document makes the older ones of that document *stale*; a stale request is
  answered at once (with None) and never starts model work;
- a running job polls its ``cancelled`` flag between decode steps, so a newer request or a
  ``$/cancelRequest`` stops it after at most one step;
- jobs run one at a time on a dedicated thread that owns the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import failpoints

log = logging.getLogger(__name__)


@dataclass
class Job:
    key: str | None  # document URI, or None for jobs that are never superseded (model loading)
    fn: Callable[[Job], Any]
    future: asyncio.Future
    cancel_event: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


@dataclass
class WorkerStats:
    submitted: int = 0
    ran: int = 0
    stale: int = 0
    cancelled_running: int = 0
    errors: int = 0
    crashes: int = 0
    restarts: int = 0


class ModelWorker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._latest: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.stats = WorkerStats()
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="granite-model", daemon=True)
        self._thread.start()

    def submit(self, key: str | None, fn: Callable[[Job], Any], *, enqueue: bool = True) -> Job:
        """Queue ``fn`` to run on the model thread; older jobs for ``key`` become stale.

        ``enqueue=False`` only holds the place (a request still being debounced): it supersedes older
        jobs and is superseded by newer ones, but never runs.
        """
        job = Job(key, fn, self._loop.create_future())
        self._ensure_alive()
        with self._lock:
            if enqueue:
                self.stats.submitted += 1
            if key is not None:
                old = self._latest.get(key)
                if old is not None:
                    self._make_stale(old)
                self._latest[key] = job
        if enqueue:
            self._queue.put(job)
        return job

    def has_pending(self, key: str) -> bool:
        with self._lock:
            return key in self._latest

    def supersede(self, key: str) -> None:
        """A document changed: whatever was queued or running for it is obsolete."""
        with self._lock:
            old = self._latest.pop(key, None)
            if old is not None:
                self._make_stale(old)

    def cancel(self, job: Job, count: bool = True) -> None:
        with self._lock:
            if self._latest.get(job.key or "") is job:
                self._latest.pop(job.key or "", None)
            self._make_stale(job, count)

    def stop(self) -> None:
        self._queue.put(None)

    def _make_stale(self, job: Job, count: bool = True) -> None:
        if job.cancel_event.is_set():
            return
        job.cancel_event.set()
        if not count:
            pass
        elif job.started:
            self.stats.cancelled_running += 1
        else:
            self.stats.stale += 1
        # Answer now; the worker will skip it (or stop it between two decode steps).
        self._loop.call_soon_threadsafe(_resolve, job.future, None, None)

    def _ensure_alive(self) -> None:
        """Restart the worker thread if it died some other way; queued jobs carry on."""
        if not self._thread.is_alive():
            log.error("model worker thread is dead")
            self._restart()

    def _restart(self) -> None:
        with self._lock:
            self.stats.restarts += 1
            log.error("starting a new model worker thread (restart %d)", self.stats.restarts)
            self._thread = threading.Thread(target=self._run, name="granite-model", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.cancelled():
                    continue
                job.started = True
                self.stats.ran += 1
            self.busy = True
            crashed: BaseException | None = None
            try:
                if job.key is not None and failpoints.fire("worker-crash"):  # document jobs only
                    raise failpoints.WorkerCrash("failpoint worker-crash")
                result, error = job.fn(job), None
            except Exception as e:  # one failing request must never take the worker down
                log.exception("model job failed")
                self.stats.errors += 1
                result, error = None, e
            except BaseException as e:  # noqa: BLE001 - the thread dies; the next submit restarts it
                log.critical("model worker thread crashed: %r", e, exc_info=True)
                self.stats.crashes += 1
                result, error, crashed = None, RuntimeError(f"model worker crashed: {e!r}"), e
            finally:
                self.busy = False
                with self._lock:
                    if job.key is not None and self._latest.get(job.key) is job:
                        self._latest.pop(job.key, None)
            self._loop.call_soon_threadsafe(_resolve, job.future, result, error)
            # Drop this job's result and error now, not when the next job ends: a failed load's
            # traceback holds the half-built model, a finished load the previous service.
            del job, result, error
            if crashed is not None:
                # This thread is done for; a fresh one takes over the queue at once.
                self._restart()
                return


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
