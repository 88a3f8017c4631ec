"""The scheduler in process: a real event loop and the real model thread, with plain functions as jobs.

Every wait is on an event (a threading.Event a job sets, a future), never on elapsed time.
"""

from __future__ import annotations

import asyncio
import queue
import threading

import pytest

from granite_lsp.postprocess import Suggestion
from granite_lsp.scheduler import Job, Priority, Scheduler, TypingRhythm
from granite_lsp.typing_through import SuggestionMemory

WAIT = 30.0  # only a bound on a hang: every wait below ends on an event


class Gate:
    """A job that says when it started and runs until released (or until it is told to stop)."""

    def __init__(self, stop_when_cancelled: bool = True) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.stop_when_cancelled = stop_when_cancelled
        self.calls = 0

    def __call__(self, job: Job) -> str:
        self.calls += 1
        self.started.set()
        while not self.release.wait(0.001):
            if self.stop_when_cancelled and job.cancelled():
                return "stopped"
        return "done"


async def _started(gate: Gate) -> None:
    assert await asyncio.to_thread(gate.started.wait, WAIT)


async def _result(job: Job):
    return await asyncio.wait_for(asyncio.shield(job.future), WAIT)


def _run(coro_fn):
    async def main():
        scheduler = Scheduler(asyncio.get_running_loop())
        try:
            await coro_fn(scheduler)
        finally:
            scheduler.stop()

    asyncio.run(main())


def test_a_newer_request_answers_the_older_one_at_once_without_running_it() -> None:
    async def body(s: Scheduler) -> None:
        gate = Gate()
        s.submit(gate)  # the model thread is busy with something else
        await _started(gate)
        ran: list[str] = []
        old = s.submit(lambda job: ran.append("old"), key="a")
        new = s.submit(lambda job: ran.append("new") or "new", key="a")
        assert await _result(old) is None  # answered while the model thread is still busy
        assert not gate.release.is_set() and s.busy
        gate.release.set()
        assert await s.answer(new) == "new"
        assert ran == ["new"] and s.stats.stale == 1

    _run(body)


def test_a_change_makes_queued_and_running_jobs_of_that_document_stale() -> None:
    async def body(s: Scheduler) -> None:
        running = Gate()
        first = s.submit(running, key="a")
        await _started(running)
        queued = s.submit(lambda job: "other doc", key="b")
        s.document_changed("a")
        assert await _result(first) is None  # answered now ...
        await asyncio.wait_for(asyncio.shield(queued.future), WAIT)
        assert running.calls == 1  # ... and the running job saw cancelled() and stopped
        assert await s.answer(queued) == "other doc"  # another document is not affected
        assert s.stats.cancelled_running == 1

    _run(body)


def test_a_job_answered_after_a_change_is_stale_even_if_it_finished_first() -> None:
    async def body(s: Scheduler) -> None:
        job = s.submit(lambda job: "result", key="a")
        await asyncio.wait_for(asyncio.shield(job.future), WAIT)
        s.document_changed("a")
        assert await s.answer(job) is None

    _run(body)


def test_a_debounced_request_made_stale_during_its_delay_never_runs() -> None:
    async def body(s: Scheduler) -> None:
        ran: list[int] = []
        held = s.submit(lambda job: ran.append(1), key="a", delay=3600)  # would wait an hour
        assert s.has_pending("a")
        s.document_changed("a")
        assert await _result(held) is None
        assert not s.has_pending("a")
        assert ran == [] and s.stats.ran == 0 and s.stats.stale == 1

    _run(body)


def test_cancel_stops_a_running_job_between_steps() -> None:
    async def body(s: Scheduler) -> None:
        gate = Gate()
        job = s.submit(gate, key="a")
        await _started(gate)
        s.cancel(job)
        assert await _result(job) is None
        nxt = s.submit(lambda job: "next", key="a")  # the thread is free again: the gate stopped
        assert await s.answer(nxt) == "next"
        assert s.stats.cancelled_running == 1

    _run(body)


def test_requests_run_before_prefetches_and_background_work() -> None:
    async def body(s: Scheduler) -> None:
        gate = Gate(stop_when_cancelled=False)
        s.submit(gate)
        await _started(gate)
        order: list[str] = []
        jobs = [
            s.submit(lambda job: order.append("background"), key="c", priority=Priority.BACKGROUND),
            s.submit(lambda job: order.append("prefetch"), key="b", priority=Priority.PREFETCH),
            s.submit(lambda job: order.append("request"), key="a"),
        ]
        gate.release.set()
        for job in jobs:
            await _result(job)
        assert order == ["request", "prefetch", "background"]

    _run(body)


def test_a_request_preempts_a_prefetch_which_then_ends() -> None:
    async def body(s: Scheduler) -> None:
        gate = Gate()
        prefetch = s.submit(gate, key="a", priority=Priority.PREFETCH)
        await _started(gate)
        request = s.submit(lambda job: "request", key="b")
        assert await s.answer(request) == "request"
        assert await _result(prefetch) is None
        assert gate.calls == 1 and s.stats.preempted == 1 and s.stats.resumed == 0

    _run(body)


def test_a_request_preempts_resumable_background_work_which_then_carries_on() -> None:
    async def body(s: Scheduler) -> None:
        steps: list[int] = []  # the background job's own saved progress
        paused = threading.Event()

        def background(job: Job) -> list[int] | None:
            while len(steps) < 100:
                if job.cancelled():
                    return None  # preempted: what it did is kept in ``steps``
                steps.append(len(steps))
                if len(steps) == 10 and not paused.is_set():
                    paused.set()  # part way: wait here for a request to preempt us
                    while not job.cancelled():
                        threading.Event().wait(0.001)
            return list(steps)

        bg = s.submit(background, key="doc", priority=Priority.BACKGROUND, resumable=True)
        assert await asyncio.to_thread(paused.wait, WAIT)
        request = s.submit(lambda job: "request", key="other")
        assert await s.answer(request) == "request"
        assert await s.answer(bg) == list(range(100))  # resumed, from where it was
        assert s.stats.preempted == 1 and s.stats.resumed == 1 and s.stats.ran == 3

    _run(body)


def test_a_failing_job_is_answered_with_its_error_and_a_crash_restarts_the_thread() -> None:
    async def body(s: Scheduler) -> None:
        def fails(job: Job) -> None:
            raise ValueError("bad request")

        def crashes(job: Job) -> None:
            raise SystemExit("thread killer")

        with pytest.raises(ValueError, match="bad request"):
            await s.answer(s.submit(fails, key="a"))
        with pytest.raises(RuntimeError, match="crashed"):
            await s.answer(s.submit(crashes, key="a"))
        assert await s.answer(s.submit(lambda job: "alive", key="a")) == "alive"
        assert (s.stats.errors, s.stats.crashes, s.stats.restarts) == (1, 1, 1)

    _run(body)


def test_a_submit_while_the_crashed_thread_is_being_replaced_starts_no_second_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The crashed job is answered before its replacement thread has started; a submit in that window
    saw a thread that was not alive yet and started another (two model threads: restarts 2, seen in CI)."""
    starting = threading.Event()
    threads: list[threading.Thread] = []

    class SlowToStart(threading.Thread):
        def start(self) -> None:
            if self.name != "granite-model":  # asyncio's executor threads
                return super().start()
            threads.append(self)
            if len(threads) > 1:  # a replacement: hold the window open a while (no timing is asserted)
                starting.set()
                submitted.wait(2.0)
            super().start()

    submitted = threading.Event()
    monkeypatch.setattr("granite_lsp.scheduler.threading.Thread", SlowToStart)

    async def body(s: Scheduler) -> None:
        def crashes(job: Job) -> None:
            raise SystemExit("thread killer")

        crash = s.submit(crashes, key="a")
        assert await asyncio.to_thread(starting.wait, WAIT)
        after = await asyncio.to_thread(lambda: s.submit(lambda job: "alive", key="b"))
        submitted.set()
        with pytest.raises(RuntimeError, match="crashed"):
            await s.answer(crash)
        assert await s.answer(after) == "alive"
        assert s.stats.restarts == 1 and len(threads) == 2

    _run(body)


def test_debounce_adapts_to_typing_speed() -> None:
    base = 0.075
    rhythm = TypingRhythm()
    assert rhythm.debounce(base) == base  # no rhythm known yet
    for i in range(6):  # fast typing: 30 ms between keystrokes
        rhythm.note(100.0 + 0.03 * i)
    fast = rhythm.debounce(base)
    assert 0.03 < fast <= 2 * base  # longer than the gap: the next key wins
    rhythm.note(100.15 + 1.1)  # a pause ends the burst
    assert rhythm.debounce(base) == base
    assert rhythm.debounce(0) == 0.0


def test_the_scheduler_keeps_each_documents_rhythm() -> None:
    async def body(s: Scheduler) -> None:
        now = [0.0]
        s._clock = lambda: now[0]
        for _ in range(6):
            s.document_changed("fast")
            now[0] += 0.03
        s.document_changed("slow")
        assert s.debounce_seconds("fast", 0.075) < 0.075 * 2
        assert s.debounce_seconds("fast", 0.075) != 0.075
        assert s.debounce_seconds("slow", 0.075) == 0.075
        assert s.debounce_seconds("unknown", 0.075) == 0.075
        s.document_closed("fast")
        assert s.debounce_seconds("fast", 0.075) == 0.075

    _run(body)


def test_suggestion_memory_serves_typed_prefixes_of_the_shown_suggestion() -> None:
    memory = SuggestionMemory()
    text, cursor = "x = \ny = 2\n", 4
    assert memory.lookup(text, cursor) == (False, None)  # nothing shown yet
    memory.remember(text, cursor, Suggestion("foo(1)", 0))
    assert memory.lookup(text, cursor) == (True, Suggestion("foo(1)", 0))  # the very same place
    typed = text[:cursor] + "fo" + text[cursor:]
    assert memory.lookup(typed, cursor + 2) == (True, Suggestion("o(1)", 0))
    other = text[:cursor] + "ba" + text[cursor:]
    assert memory.lookup(other, cursor + 2) == (False, None)  # typed something else
    assert memory.lookup("z" + typed, cursor + 3) == (False, None)  # the text before the cursor changed
    assert memory.lookup(typed + "z", cursor + 2) == (False, None)  # the text after the cursor changed
    whole = text[:cursor] + "foo(1)" + text[cursor:]
    assert memory.lookup(whole, cursor + 6) == (False, None)  # typed it all: nothing left to serve
    assert memory.lookup(text[: cursor - 1] + text[cursor:], cursor - 1) == (False, None)  # deleted backwards


def test_suggestion_memory_remembers_that_there_was_nothing_to_suggest() -> None:
    memory = SuggestionMemory()
    memory.remember("x = 1\n", 5, None)
    assert memory.lookup("x = 1\n", 5) == (True, None)
    assert memory.lookup("x = 12\n", 6) == (False, None)
    memory.remember("x = \n", 4, Suggestion("1  ", 0))
    assert memory.lookup("x = 1\n", 5) == (True, None)  # only blanks would be left


def test_service_keeps_one_memory_per_document(make_service) -> None:
    """Typing through, the prompt builder and forgetting a closed document, through the real service."""
    svc = make_service(maxTokens=8)
    text = "def add(a, b):\n    return "
    first = svc.complete("file:///a.py", text, len(text))
    assert first.generation.stop_reason != "typed_through"
    again = svc.complete("file:///a.py", text, len(text))
    assert again.generation.stop_reason == "typed_through" and again.suggestion == first.suggestion
    other = svc.complete("file:///b.py", text, len(text))  # another document has its own memory
    assert other.generation.stop_reason != "typed_through" and svc.typed_through == 1
    builder = svc.document("file:///a.py").builder
    assert svc.document("file:///a.py", svc.settings.updated({"prefixTokens": 100})).builder is not builder
    svc.forget("file:///a.py")
    assert svc.complete("file:///a.py", text, len(text)).generation.stop_reason != "typed_through"


class _PausingQueue(queue.PriorityQueue):
    """The scheduler's own queue type, pausing the model thread right after it took a background job
    (before the job starts): the moment at which a request may arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.took_background = threading.Event()
        self.go_on = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None):
        entry = super().get(block, timeout)
        if entry[0] == Priority.BACKGROUND and not self.took_background.is_set():
            self.took_background.set()
            assert self.go_on.wait(WAIT)
        return entry


def test_a_request_that_arrives_while_background_work_is_being_taken_still_runs_first() -> None:
    """Taken off the queue but not started yet, a preemptible job is not running, so the request
    preempts nothing; it must still not wait for the whole job (up to the work-ahead budget)."""

    async def body(s: Scheduler) -> None:
        gate = Gate()
        s.submit(gate)  # the model thread is busy; its next look at the queue sees the pausing one
        await _started(gate)
        pausing = s._queue = _PausingQueue()
        order: list[str] = []
        bg = s.submit(lambda job: order.append("background") or "bg", key="a", priority=Priority.BACKGROUND)
        gate.release.set()
        assert await asyncio.to_thread(pausing.took_background.wait, WAIT)
        request = s.submit(lambda job: order.append("request") or "request", key="b")
        pausing.go_on.set()
        assert await s.answer(request) == "request"
        assert await s.answer(bg) == "bg"
        assert order == ["request", "background"]

    _run(body)


def test_a_job_that_runs_after_a_model_reload_runs_on_the_new_model(make_service) -> None:
    """A request held by its debounce, or background work that a reload preempted, runs after the load:
    on the model loaded then, not on the one the reload dropped (which it would also keep in memory
    through the whole load)."""
    from granite_lsp.completions import submit_completion
    from granite_lsp.server import GraniteServer
    from granite_lsp.settings import Settings

    async def main() -> None:
        server = GraniteServer(Settings().updated({"maxTokens": 4}))
        old, new = make_service(maxTokens=4), make_service(maxTokens=4)
        server.service = old
        text = "def add(a, b):\n    return "
        doc = server.documents.open("file:///a.py", text, 0)
        gate = Gate()
        server.scheduler.submit(gate)  # the model thread is busy (the load)
        await _started(gate)
        job = submit_completion(server, doc, len(text))
        server.service = new  # what load_model does once the new model is there
        gate.release.set()
        completion = await asyncio.wait_for(server.scheduler.answer(job), WAIT)
        server.scheduler.stop()
        assert completion is not None and completion.generation.stats.generated_tokens > 0
        assert (old.decoded_tokens, new.decoded_tokens) == (0, completion.generation.stats.generated_tokens)

    asyncio.run(main())
