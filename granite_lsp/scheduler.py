"""The scheduler owns a job's life: debounce, staleness, cancellation, priority, one model thread.

The LSP loop must never wait on the model (edits keep arriving while a suggestion is generated), and an
editor fires a request per keystroke, most of them obsolete by the time the model is free. So every
decision about whether a job may still run, or is still wanted, is made here:
- *staleness*: each document has a lane with a change counter; a job remembers the count it was made for,
  and any change of the document makes its jobs stale. A newer request for a document also makes the older
  ones stale (latest wins). A stale job is answered at once (None) and never starts model work; a running
  one sees ``cancelled()`` between two pieces of its prefill (``StateCache.request_chunk`` tokens, the
  work done kept as a checkpoint) and between decode steps, and stops there;
- *debounce*: an automatic request can be held for a delay (``debounce_seconds``, adapted to the typing
  rhythm) before it is queued, during which a newer keystroke makes it stale without any model work;
- *cancellation*: ``cancel`` ($/cancelRequest) makes one job stale;
- *priority*: jobs run one at a time on a dedicated thread that owns the model, the lowest ``Priority``
  first (FIFO within one). A request preempts a running job of a lower priority that allows it: the job sees
  ``cancelled()``; a ``resumable`` one (background precomputation) is queued again to carry on later, the
  others (a prefetch) end there;
- *waits*: how long each request waited for the model thread once ready (after its debounce), split by
  what held the thread then (``timeline.WaitStats``), and the request's moments on its ``Timeline``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from . import failpoints, memory
from .timeline import Timeline, WaitStats

log = logging.getLogger(__name__)


class Priority(IntEnum):
    REQUEST = 0  # what the user asked for, and control jobs (load, configure, forget) in order with it
    PREFETCH = 1  # a guess at the next request; preempted by a request and then dropped
    BACKGROUND = 2  # precomputation; preempted by a request and, when resumable, carried on later


@dataclass(eq=False)
class Job:
    key: str | None  # document URI, or None for jobs that are never stale (model loading, configuration)
    fn: Callable[[Job], Any]
    future: asyncio.Future[Any]
    priority: Priority = Priority.REQUEST
    change: int = 0  # the document's change count the job was made for
    preemptible: bool = False
    resumable: bool = False
    cancel_event: threading.Event = field(default_factory=threading.Event)
    preempt_event: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    finished: bool = False
    timeline: Timeline = field(default_factory=Timeline)
    # Set once the job's request was answered early with the first line of what it generates
    # (completions.py): True while the document's changes are the user typing through (accepting) that
    # suggestion, which the job then survives, carrying on for the typing-through memory. Called with a
    # new request's offset (None for a change): True only where that request is at the typed text's end.
    typed_through: Callable[[int | None], bool] | None = None

    def cancelled(self) -> bool:
        """Stop now? Polled by the model between steps: stale, cancelled or preempted."""
        return self.cancel_event.is_set() or self.preempt_event.is_set()

    def stale(self) -> bool:
        """No longer wanted: its answer is None whatever it computed."""
        return self.cancel_event.is_set()


@dataclass
class WorkerStats:
    submitted: int = 0
    ran: int = 0
    stale: int = 0
    cancelled_running: int = 0
    preempted: int = 0
    resumed: int = 0
    errors: int = 0
    crashes: int = 0
    restarts: int = 0


@dataclass
class TypingRhythm:
    """The typing rhythm of one document: a smoothed interval between keystrokes within a burst."""

    last_change: float | None = None
    interval: float | None = None

    def note(self, now: float) -> None:
        last = self.last_change
        if last is not None and now - last < 1.0:
            prev = self.interval if self.interval is not None else now - last
            self.interval = 0.7 * prev + 0.3 * (now - last)
        else:
            self.interval = None  # a pause ends the burst
        self.last_change = now

    def debounce(self, base: float) -> float:
        """How long an automatic request waits before it may start model work.

        Long enough that, while the user types in a burst, the next keystroke arrives first (so the
        request is stale before the model starts); short when the user types slowly. Before any typing
        rhythm is known (the first keystroke), the configured base value.
        """
        if base <= 0:
            return 0.0
        if self.interval is None:
            return base
        return min(2 * base, max(0.02, 1.2 * self.interval))


@dataclass
class Lane:
    """One document's scheduling state."""

    changes: int = 0
    latest: Job | None = None  # the newest request or prefetch: a newer one makes it stale
    rhythm: TypingRhythm = field(default_factory=TypingRhythm)


class Scheduler:
    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.monotonic) -> None:
        self._loop = loop
        self._clock = clock
        self._queue: queue.PriorityQueue[tuple[int, int, Job | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lanes: dict[str, Lane] = {}
        self._lock = threading.Lock()
        self._running: Job | None = None
        self.stats = WorkerStats()
        self.waits = WaitStats()
        self._thread = threading.Thread(target=self._run, name="granite-model", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._running is not None

    # ---- the loop's side ---------------------------------------------------------------------------

    def submit(
        self,
        fn: Callable[[Job], Any],
        *,
        key: str | None = None,
        priority: Priority = Priority.REQUEST,
        delay: float = 0.0,
        preemptible: bool | None = None,
        resumable: bool = False,
        timeline: Timeline | None = None,
        at: int | None = None,
    ) -> Job:
        """The one way to run ``fn`` on the model thread; its answer is ``job.future``.

        With a ``key`` the job belongs to that document's current text: a change makes it stale, and a
        request or prefetch makes the document's previous one stale. ``delay`` holds it back first
        (debounce). Jobs below REQUEST priority are preemptible unless told otherwise. ``timeline``: the
        request's, marked from its arrival (the scheduler marks when it is ready and when it starts).
        ``at``: the request's offset in the document, which decides whether a job being typed through
        survives it (only a request at the end of the typed text is served by that job).
        """
        preemptible = priority > Priority.REQUEST if preemptible is None else preemptible
        job = Job(key, fn, self._loop.create_future(), priority, preemptible=preemptible, resumable=resumable)
        if timeline is not None:
            job.timeline = timeline
        self._ensure_alive()
        with self._lock:
            self.stats.submitted += 1
            if key is not None:
                lane = self._lanes.setdefault(key, Lane())
                job.change = lane.changes
                if priority <= Priority.PREFETCH:
                    if lane.latest is not None and not self._survives(lane.latest, lane, at, request=True):
                        self._make_stale(lane.latest)
                    lane.latest = job
        if delay > 0:
            self._loop.call_later(delay, self._enqueue, job)
        else:
            self._enqueue(job)
        return job

    def has_pending(self, key: str) -> bool:
        """A request or prefetch for ``key`` is queued, held or running."""
        with self._lock:
            lane = self._lanes.get(key)
            return lane is not None and lane.latest is not None

    def debounce_seconds(self, key: str, base: float) -> float:
        lane = self._lanes.get(key)
        return lane.rhythm.debounce(base) if lane is not None else max(base, 0.0)

    def document_changed(self, key: str) -> None:
        """A document changed: whatever was held, queued or running for it is stale, unless the change
        is the user typing through the suggestion a job is generating (``Job.typed_through``)."""
        with self._lock:
            lane = self._lanes.setdefault(key, Lane())
            lane.changes += 1
            lane.rhythm.note(self._clock())
            if lane.latest is not None and not self._survives(lane.latest, lane):  # held, queued or running
                self._make_stale(lane.latest)
            for job in [self._running, *(entry[2] for entry in list(self._queue.queue))]:
                if job is not None and job.key == key and not self._survives(job, lane):
                    self._make_stale(job)

    def document_closed(self, key: str) -> None:
        self.document_changed(key)
        with self._lock:
            self._lanes.pop(key, None)

    def cancel(self, job: Job) -> None:
        """$/cancelRequest: this job is no longer wanted."""
        with self._lock:
            self._make_stale(job)

    async def answer(self, job: Job) -> Any:
        """The job's result, or None if it became stale before its answer is given."""
        result = await job.future
        return None if self.is_stale(job) else result

    def is_stale(self, job: Job) -> bool:
        with self._lock:
            return self._is_stale(job)

    def stop(self) -> None:
        self._queue.put((len(Priority), next(self._seq), None))

    # ---- internals -----------------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        """Queue a job whose delay is over, unless it is stale by now; a request preempts what runs below it."""
        with self._lock:
            if self._is_stale(job):
                return
            running = self._running
            job.timeline.mark("ready")
            job.timeline.behind = "idle" if running is None else running.priority.name.lower()
            if running is not None and running.preemptible and running.priority > job.priority:
                running.preempt_event.set()
                self.stats.preempted += 1
            self._queue.put((job.priority, next(self._seq), job))

    def _make_stale(self, job: Job) -> None:
        if job.cancel_event.is_set():
            return
        job.cancel_event.set()
        if job.finished:
            pass  # its answer was on its way: only not given
        elif job.started:
            self.stats.cancelled_running += 1
        else:
            self.stats.stale += 1
        lane = self._lanes.get(job.key) if job.key is not None else None
        if lane is not None and lane.latest is job:
            lane.latest = None
        # Answer now; the worker will skip it (or stop it between two decode steps).
        self._loop.call_soon_threadsafe(_resolve, job.future, None, None)

    def _survives(self, job: Job, lane: Lane, at: int | None = None, request: bool = False) -> bool:
        """Whether ``job`` carries on through its document's change or a newer request (the lock held):
        only one answered early, while the document is its text with the suggestion being typed through,
        and for a ``request``, only one at ``at``, the end of the typed text (a request elsewhere, or one
        without a place, is not served by it); it then belongs to the document's current text."""
        if job.typed_through is None or job.cancel_event.is_set() or (request and at is None):
            return False
        if not job.typed_through(at):
            return False
        job.change = lane.changes
        return True

    def _is_stale(self, job: Job) -> bool:
        """Cancelled, or its document changed since it was made (the one staleness rule)."""
        if job.cancel_event.is_set():
            return True
        lane = self._lanes.get(job.key) if job.key is not None else None
        if job.key is not None and (lane is None or lane.changes != job.change):
            self._make_stale(job)
            return True
        return False

    def _outranked(self, job: Job) -> bool:
        """A job of a higher priority waits in the queue (its head: the lowest priority value)."""
        head = self._queue.queue[0] if self._queue.queue else None
        return head is not None and head[0] < job.priority

    def _note_start(self, job: Job) -> None:
        """The model thread starts ``job``: a request's wait since it was ready goes to the record
        (a resumed background job keeps its first marks)."""
        timeline = job.timeline
        timeline.mark("started")
        if job.priority == Priority.REQUEST and job.key is not None and timeline.behind is not None:
            wait = timeline.ms("ready", "started")
            if wait is not None:
                self.waits.note(timeline.behind, wait)

    def _ensure_alive(self) -> None:
        """Restart the worker thread if it died some other way; queued jobs carry on. Under the lock:
        a replacement being started by ``_restart`` is not alive until its start returns."""
        with self._lock:
            if self._thread.is_alive():
                return
            log.error("model worker thread is dead")
            self._start_thread()

    def _restart(self) -> None:
        with self._lock:
            self._start_thread()

    def _start_thread(self) -> None:
        """A new model thread (the lock held). Published only once started, so a thread that is not
        alive is one that died, never one that is starting."""
        self.stats.restarts += 1
        log.error("starting a new model worker thread (restart %d)", self.stats.restarts)
        thread = threading.Thread(target=self._run, name="granite-model", daemon=True)
        thread.start()
        self._thread = thread

    def _run(self) -> None:
        while True:
            job = self._queue.get()[2]
            if job is None:
                return
            with self._lock:
                if self._is_stale(job):
                    continue
                if job.preemptible and self._outranked(job):
                    # Taken off the queue just as a request came (nothing ran yet, so ``_enqueue``
                    # preempted nothing): back to the queue, as if the request had come a moment earlier.
                    self._queue.put((job.priority, next(self._seq), job))
                    continue
                job.started = True
                self.stats.ran += 1
                self._running = job
                self._note_start(job)
            crashed = self._run_one(job)
            del job  # its result and error go now, not when the next job ends (a load holds a model)
            if crashed:
                self._restart()  # this thread is done for; a fresh one takes over the queue at once
                return
            if self._queue.empty():
                # Idle: the heap's free pages back to the OS (memory.py; ~1 ms). Short prefills, background
                # pieces and their piece-start snapshots leave freed buffers the long-prefill trim never sees.
                memory.release()

    def _run_one(self, job: Job) -> bool:
        """Run ``job`` and answer it (or queue it again if it was preempted and can resume); True if the
        thread must end (a BaseException other than Exception escaped the job)."""
        crashed = False
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
            result, error, crashed = None, RuntimeError(f"model worker crashed: {e!r}"), True
        with self._lock:
            self._running = None
            job.finished = True
            preempted = job.preempt_event.is_set() and not job.stale()
            if preempted and job.resumable and error is None:
                job.preempt_event.clear()
                job.started = job.finished = False
                self.stats.resumed += 1
                self._queue.put((job.priority, next(self._seq), job))
                return crashed
            lane = self._lanes.get(job.key) if job.key is not None else None
            if lane is not None and lane.latest is job:
                lane.latest = None
        if preempted:
            result, error = None, None  # a preempted prefetch ends with nothing
        self._loop.call_soon_threadsafe(_resolve, job.future, result, error)
        return crashed


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
