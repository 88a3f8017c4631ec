"""Work ahead of the request: bring the model state for the likely next request up to date while the user
reads, scrolls or pauses (issue 15), so that the request itself finds its prompt already processed.

Where the user is comes from the client's ``granite/focus`` notification (uri, position; sent on editor
focus and cursor moves), else from the last request's position. The likely next request is:
- after a request is answered, once the user pauses: one at the same place (what it could not use yet);
- after a focus: a request at the focused position (a cursor jump, a file brought to the front);
- after an edit away from where the user last typed (a paste, an import added at the top): a request
  back there (its line follows the edit's added or removed lines);
- after a didOpen: the position known for the document, if any.
For that request it builds the short window's prompt first and then the full window's (progressive.py:
a request served before the full one is ready uses the short one).
The work runs as a BACKGROUND job of the scheduler: preemptible (a request preempts it within one layer
of a piece of ``StateCache.chunk`` tokens, or the short rest of that piece: StateCache.prefill's
``interrupt``) and resumable (it is queued again and carries on from the checkpoint where
it stopped). It is stale when the document changes or closes (the scheduler's rule), and is cancelled
when the user moves elsewhere. Only the document the user is looking at gets any, and at most
``BUDGET_TOKENS`` of it between two things the user does there (focus, request, edit).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .scheduler import Job, Priority

if TYPE_CHECKING:
    from .server import GraniteServer

FOCUS = "granite/focus"
# Quiet time before work ahead starts: cursor moves come in bursts (a held arrow key, a scroll).
DEBOUNCE_S = 0.1
# After a request is answered, work ahead at its place waits for this much quiet: while the user types,
# the next keystroke comes first (its own request does the work; background work started between two
# keystrokes would only delay the next request by a piece).
AFTER_ANSWER_S = 0.3
# Tokens processed ahead per document between two user actions there: more than one whole prompt (the
# prefix and suffix budgets plus other files' context), bounded however long the user stays away.
BUDGET_TOKENS = 4096


@dataclass
class AheadStats:
    jobs: int = 0  # work ahead submitted
    runs: int = 0  # times a job ran (a preempted one runs again)
    completed: int = 0  # prompts brought to their end
    preempted: int = 0  # runs that stopped for a request (or staleness) before the end
    over_budget: int = 0  # runs not started: the document's budget was spent
    tokens: int = 0
    ms: float = 0.0
    pieces: deque[float] = field(default_factory=lambda: deque(maxlen=512))  # ms between two yield checks

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {k: float(v) for k, v in vars(self).items() if k != "pieces"}
        pieces = sorted(self.pieces)
        if pieces:
            out["piece_ms_median"] = pieces[len(pieces) // 2]
            out["piece_ms_p95"] = pieces[min(len(pieces) - 1, round(0.95 * (len(pieces) - 1)))]
        return out


@dataclass
class _Place:
    line: int
    character: int


class WorkAhead:
    """The server's work-ahead policy; the loop's side (events in), jobs run on the model thread."""

    def __init__(self, server: GraniteServer) -> None:
        self._server = server
        self.stats = AheadStats()
        self.focused: str | None = None  # the document the user looks at
        self._focus: dict[str, _Place] = {}  # where the cursor is (granite/focus)
        self._typing: dict[str, _Place] = {}  # where the last request was
        self._lines: dict[str, int] = {}  # line counts, to follow the typing place across edits above it
        self._jobs: dict[str, Job] = {}
        self._spent: dict[str, int] = {}  # tokens since the user last did something there

    # ---- events (the loop's side) --------------------------------------------------------------------

    def focus(self, params: Any) -> None:
        """granite/focus {textDocument: {uri}, position: {line, character}}."""
        try:
            uri = str(_field(_field(params, "textDocument"), "uri"))
            position = _field(params, "position")
            place = _Place(int(_field(position, "line")), int(_field(position, "character")))
        except (AttributeError, KeyError, TypeError, ValueError):
            return  # not ours to fix: a malformed notification changes nothing
        self._look_at(uri)
        self._focus[uri] = place
        if place != self._typing.get(uri):  # where the last request was: its prefill is done
            self._start(uri, place)

    def requested(self, uri: str, line: int, character: int) -> None:
        """A completion request: the user is there. Work ahead for another place is obsolete."""
        self._look_at(uri)
        self._typing[uri] = self._focus[uri] = _Place(line, character)
        self._spent.pop(uri, None)
        self._cancel(uri)

    def answered(self, uri: str) -> None:
        """A request there was answered: once the user pauses, work ahead at its place builds what the
        request could not use yet (the full window after an answer from the short one, progressive.py)
        and keeps the short window current (an edit far above then costs it ~nothing)."""
        place = self._typing.get(uri)
        if place is not None and uri == self.focused:
            self._start(uri, _Place(place.line, place.character), delay=AFTER_ANSWER_S)

    def changed(self, uri: str, line: int) -> None:
        """didOpen/didChange (the scheduler has made the document's jobs stale already)."""
        doc = self._server.documents.get(uri)
        if doc is None:
            return
        lines, before = len(doc.line_starts), self._lines.get(uri)
        self._lines[uri] = lines
        self._spent.pop(uri, None)
        typing = self._typing.get(uri)
        if before is None:  # opened: work ahead where the user was, if we know it
            place = self._focus.get(uri) or typing
            if place is not None and uri == self.focused:
                self._start(uri, place)
            return
        if typing is None or line == typing.line:
            return  # typing at the cursor: its own requests follow at once
        if line < typing.line:
            typing.line = max(line, typing.line + lines - before)
        if uri == self.focused:
            self._start(uri, typing)

    def closed(self, uri: str) -> None:
        self._cancel(uri)
        for table in (self._focus, self._typing, self._lines, self._spent):
            table.pop(uri, None)
        if self.focused == uri:
            self.focused = None

    # ---- internals -----------------------------------------------------------------------------------

    def _look_at(self, uri: str) -> None:
        if self.focused is not None and self.focused != uri:
            self._cancel(self.focused)  # the user is not looking there any more
        self.focused = uri

    def _cancel(self, uri: str) -> None:
        job = self._jobs.pop(uri, None)
        if job is not None:
            self._server.scheduler.cancel(job)

    def _start(self, uri: str, place: _Place, delay: float = DEBOUNCE_S) -> None:
        server = self._server
        doc = server.documents.get(uri)
        self._cancel(uri)
        if server.service is None or doc is None or doc.out_of_sync or not server.settings.reuse:
            return
        cursor = doc.offset_at(place.line, place.character, server.position_encoding)
        text, settings, context = doc.text, server.settings, server.context
        stats, spent = self.stats, self._spent

        def run(job: Job) -> None:
            # The model loaded now: preempted by a reload, this job runs after it (see submit_completion).
            service = server.service
            if service is None:
                return
            if spent.get(uri, 0) >= BUDGET_TOKENS:
                stats.over_budget += 1
                return
            stats.runs += 1
            last, pieces = [time.perf_counter()], [0]
            chunk = getattr(service.cache, "chunk", 1)

            def should_yield() -> bool:
                # Between two pieces of at most ``chunk`` tokens: the wait a request sees is one piece.
                now = time.perf_counter()
                stats.pieces.append((now - last[0]) * 1000.0)
                last[0] = now
                pieces[0] += 1
                return job.cancelled() or spent.get(uri, 0) + pieces[0] * chunk >= BUDGET_TOKENS

            tokenizer = service.loaded.tokenizer
            ids = context.ids(uri, tokenizer, settings.context_tokens, settings.filename_in_prompt)
            t0 = time.perf_counter()
            result = service.prepare(
                uri, text, cursor, should_yield, interrupt=job.cancelled, settings=settings, context_ids=ids
            )
            stats.ms += (time.perf_counter() - t0) * 1000.0
            if result is None:
                return
            stats.tokens += result.processed_tokens
            spent[uri] = spent.get(uri, 0) + result.processed_tokens
            if result.complete:
                stats.completed += 1
            else:
                stats.preempted += 1

        self.stats.jobs += 1
        self._jobs[uri] = server.scheduler.submit(
            run, key=uri, priority=Priority.BACKGROUND, delay=delay, resumable=True
        )


def _field(obj: Any, name: str) -> Any:
    """A field of a custom notification's params (a dict, or the object the JSON-RPC layer made of it)."""
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)
