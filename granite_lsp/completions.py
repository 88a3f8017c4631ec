"""Inline completion requests: from the LSP request to a scheduled job, and from its answer to an LSP item.

Requests and the prefetch after an accepted suggestion go through one submission path
(``submit_completion``); whether a job is still wanted is the scheduler's decision alone (``answer``
gives None for a stale one). Early first lines and final answers are shaped by the same
``Shaper.finish`` (``service.Progress.first_line``), so the early answer is the final one's first line.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from lsprotocol import types

from .documents import Document, PositionError
from .postprocess import Suggestion
from .scheduler import Job, Priority
from .service import Completion, Progress, ProgressSink
from .timeline import Timeline

if TYPE_CHECKING:
    from .server import GraniteServer

log = logging.getLogger(__name__)

PARTIAL = "granite/partialCompletion"
ACCEPTED = "granite.accepted"
# The model thread waits for the loop to write the request's first partial that shows text before it
# decodes on (at most this long: only a stuck loop takes it): handed over without a wait, that partial sat
# in the loop's queue while the next decode step held the interpreter (bench, type_short, loaded machine:
# "send" median 3.6 ms, p95 24 ms).
FIRST_TEXT_HANDOVER_S = 0.25


def submit_completion(
    server: GraniteServer,
    doc: Document,
    cursor: int,
    *,
    priority: Priority = Priority.REQUEST,
    delay: float = 0.0,
    on_progress: ProgressSink | None = None,
    timeline: Timeline | None = None,
    candidates: int = 1,
) -> Job:
    """The one way a completion reaches the model: the document's text now, the settings now, the model
    loaded when the job runs (a job that waited through a reload must neither use nor keep the old one)."""
    settings, context = server.settings, server.context
    uri, text = doc.uri, doc.text

    def run(job: Job) -> Completion | None:
        service = server.service
        if service is None:  # a load is under way, or failed: nothing to complete with
            return None
        # Other files' context is tokenized here, inside the job's error handling.
        tokenizer = service.loaded.tokenizer
        context_ids = context.ids(uri, tokenizer, settings.context_tokens, settings.filename_in_prompt)
        job.timeline.mark("context")
        return service.complete(
            uri,
            text,
            cursor,
            settings=settings,
            context_ids=context_ids,
            cancelled=job.cancelled,
            on_progress=on_progress,
            timeline=job.timeline,
            candidates=candidates,
        )

    return server.scheduler.submit(run, key=uri, priority=priority, delay=delay, timeline=timeline, at=cursor)


class _Watcher:
    """What the request shows while the job runs: partial notifications (our streaming clients), or the
    first complete line as an early answer (standard clients: the rest keeps generating and is served
    from the typing-through memory when the user accepts that line)."""

    def __init__(
        self,
        server: GraniteServer,
        uri: str,
        version: int | None,
        position: types.Position,
        timeline: Timeline,
        candidates: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.timeline = timeline
        self._notify = server.protocol.notify
        settings = server.settings
        self.stream = server.client_streams()
        # An early answer has one item: a request for several waits for them all.
        # A client shown no partials (a standard one, or ours with streaming off) gets the first line early.
        self.early_wanted = not self.stream and settings.early_first_line and not settings.raw and candidates == 1
        self.early: asyncio.Future[Suggestion] = self._loop.create_future()
        request_id = str(server.protocol.msg_id) if hasattr(server.protocol, "msg_id") else ""
        pos = {"line": position.line, "character": position.character}
        self._payload = {"uri": uri, "version": version, "position": pos, "requestId": request_id}
        self._text_shown = False
        self.latest: Progress | None = None  # the generation so far (read by ``typing_through``)

    def on_progress(self, progress: Progress) -> None:  # model thread
        self.latest = progress
        if self.stream and progress.shown and not self._text_shown:
            self._text_shown = True  # the first text the user sees: out before the next decode step
            written = threading.Event()
            self._loop.call_soon_threadsafe(self._send, {**self._payload, "text": progress.shown, "done": False})
            self._loop.call_soon_threadsafe(written.set)
            written.wait(FIRST_TEXT_HANDOVER_S)
        elif self.stream:
            self.partial(progress.shown)
        elif self.early_wanted and not self.early.done():
            first = progress.first_line()
            if first is not None:
                self._loop.call_soon_threadsafe(_resolve_once, self.early, first)

    def typing_through(self, server: GraniteServer, uri: str, text: str, cursor: int) -> Callable[[int | None], bool]:
        """After an early answer: whether the document now is ``text`` with a beginning of the suggestion
        being generated typed at ``cursor`` (the user accepted the first line, or types on through it),
        and, given a new request's offset ``at``, whether it is at the end of that typed text. The job
        then carries on, and its whole suggestion serves the requests that follow from the typing-through
        memory. Called on the loop, under the scheduler's lock."""
        early = self.early.result()

        def check(at: int | None) -> bool:
            doc = server.documents.get(uri)
            if doc is None or doc.out_of_sync:
                return False
            now = doc.text
            typed = len(now) - len(text)
            if typed < 0 or not (now.startswith(text[:cursor]) and now.endswith(text[cursor:])):
                return False
            if at is not None and at != cursor + typed:
                return False  # a request elsewhere: the typing-through memory does not answer it
            middle = now[cursor : cursor + typed]
            so_far = self.latest
            shaped = so_far.shaper.finish(so_far.shown) if so_far and so_far.shaper else None
            return any(s.startswith(middle) for s in (early.text, shaped.text if shaped else ""))

        return check

    def partial(self, text: str, done: bool = False) -> None:
        self._loop.call_soon_threadsafe(self._send, {**self._payload, "text": text, "done": done})

    def _send(self, params: dict[str, Any]) -> None:  # the loop
        self._notify(PARTIAL, params)
        if params["text"]:
            self.timeline.mark("sent")  # the first partial with new text is out


async def inline_completion(
    server: GraniteServer, params: types.InlineCompletionParams
) -> types.InlineCompletionList | None:
    timeline = Timeline.starting_now()
    uri = params.text_document.uri
    doc = server.documents.get(uri)
    if doc is None or doc.out_of_sync or server.service is None:
        return None
    encoding = server.position_encoding
    try:
        cursor = doc.offset_at(params.position.line, params.position.character, encoding, strict=True)
    except PositionError as e:
        log.warning("inline completion at an invalid position: %s", e)
        return None
    automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
    settings = server.settings
    delay = server.scheduler.debounce_seconds(uri, settings.debounce_ms / 1000.0) if automatic else 0.0
    # Several candidates when the user asks (VS Code asks again, invoked, to cycle), one while typing.
    candidates = settings.typing_candidates if automatic else settings.candidates
    watch = _Watcher(server, uri, doc.version, params.position, timeline, candidates)
    text = doc.text
    job = submit_completion(
        server, doc, cursor, delay=delay, on_progress=watch.on_progress, timeline=timeline, candidates=candidates
    )
    try:
        await asyncio.wait({job.future, watch.early}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        server.scheduler.cancel(job)  # $/cancelRequest: stop between two decode steps
        raise
    if not job.future.done():
        if server.scheduler.is_stale(job):
            return None
        server.counters["early_first_line"] = server.counters.get("early_first_line", 0) + 1
        suggestions = [watch.early.result()]
        if settings.type_through:  # accepting it keeps it going: the rest comes from the typing-through memory
            job.typed_through = watch.typing_through(server, uri, text, cursor)
    else:
        suggestions = _final(server, await _answer(server, job), watch)
    return make_items(server, doc, params.position, cursor, suggestions, encoding) if suggestions else None


async def _answer(server: GraniteServer, job: Job) -> Completion | None:
    try:
        completion: Completion | None = await server.scheduler.answer(job)
        return completion
    except Exception as e:
        server.counters["errors"] += 1
        log.error("completion failed: %s", e)
        return None


def _final(server: GraniteServer, completion: Completion | None, watch: _Watcher) -> list[Suggestion]:
    """The answer's suggestions: the first candidate (when there is one) and the alternatives."""
    if completion is None:
        return []
    gen = completion.generation
    timeline = watch.timeline
    server.last_stats = {
        **asdict(gen.stats),
        "total_ms": gen.stats.total_ms,
        "stop_reason": gen.stop_reason,
        "phases": timeline.phases(),
        "behind": timeline.behind,
        "steps_to_visible": timeline.steps_to_visible,
        "forwards_to_visible": timeline.forwards_to_visible,
        "window": completion.window,
    }
    if completion.alternatives:
        server.counters["alternatives"] = server.counters.get("alternatives", 0) + len(completion.alternatives)
    if watch.stream:
        watch.partial(completion.suggestion.text if completion.suggestion else "", True)
    first = [completion.suggestion] if completion.suggestion else []
    return first + completion.alternatives


def make_items(
    server: GraniteServer,
    doc: Document,
    start: types.Position,
    cursor: int,
    suggestions: list[Suggestion],
    encoding: str,
) -> types.InlineCompletionList:
    """One item per suggestion, in order (the editors show the first and cycle through the others)."""
    items = []
    for suggestion in suggestions:
        end_line, end_char = doc.position_at(cursor + suggestion.replace, encoding)
        rng: types.Range | None = types.Range(start=start, end=types.Position(line=end_line, character=end_char))
        if suggestion.replace == 0 and server.client_draws_ranges_as_overlay():
            rng = None  # Neovim draws any ranged item over the rest of the line; an insertion needs none
        accepted = {"uri": doc.uri, "line": start.line, "character": start.character, "text": suggestion.text}
        command = types.Command(title="Granite: accepted", command=ACCEPTED, arguments=[accepted])
        items.append(types.InlineCompletionItem(insert_text=suggestion.text, range=rng, command=command))
    return types.InlineCompletionList(items=items)


def prefetch_after_accept(server: GraniteServer, info: dict[str, Any]) -> None:
    """After a suggestion is accepted, compute the next one at the position after it.

    It yields to real requests: skipped when one is already pending, made stale by any that comes for
    the document, preempted by any other; its result waits in the typing-through memory for the
    editor's next request.
    """
    uri = info.get("uri")
    doc = server.documents.get(uri) if isinstance(uri, str) else None
    if doc is None or doc.out_of_sync or server.service is None or server.scheduler.has_pending(doc.uri):
        return
    try:
        line, character = int(info["line"]), int(info["character"])
        start = doc.offset_at(line, character, server.position_encoding, strict=True)
    except (KeyError, TypeError, ValueError):
        return
    cursor = start + len(str(info.get("text", "")))
    if cursor > len(doc.text):
        return
    server.counters["prefetches"] = server.counters.get("prefetches", 0) + 1
    submit_completion(server, doc, cursor, priority=Priority.PREFETCH)


def _resolve_once(future: asyncio.Future[Suggestion], value: Suggestion) -> None:
    if not future.done():
        future.set_result(value)
