"""Where a request's time goes: the moments of one request, and how long requests wait for the model.

A request's time to its first visible text is the sum of parts that different modules own: the
scheduler holds it (debounce) and queues it (a background job may hold the model thread when it becomes
ready), the completion job tokenizes other files' context, the service builds the prompt, the engine
prefills and chooses the first token (healed bytes show nothing, so more steps may follow before any text
does), and the partial goes back through the event loop. Each owner marks its moment on the request's
``Timeline``; the phases are differences of consecutive marks, so they add up to the whole, on the
server's clock from the request's arrival at its handler (the transport's reading and parsing before
that are not in it; the bench's client-side figure from its send is).
``decoded_on`` (the token after the first visible one) is not a phase: it shows that the partial with
the first text was written out before the model thread decoded on (completions' handover).

``WaitStats`` is the scheduler's record of the queue wait (ready to started), split by what held the
model thread when the request became ready: nothing ("idle"), another request, a prefetch, or background
work ahead of requests (issue 15: a request must wait <= ~100 ms for background work, p95).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

# The moments of a request, in order; a phase is named after the mark that ends it.
MARKS = ("arrived", "ready", "started", "context", "prompt", "first_token", "visible", "sent")
PHASES = {
    "ready": "debounce",  # arrived -> ready: held by the debounce of automatic requests
    "started": "queue",  # ready -> the model thread starts it (waiting for whatever ran)
    "context": "context",  # other files' context tokenized
    "prompt": "prompt",  # the FIM prompt built (the document tokenized, the anchor kept)
    "first_token": "prefill",  # checkpoint restore + the tokens processed + the first token chosen
    "visible": "to_visible",  # decode steps until a token adds text (token healing shows nothing)
    "sent": "send",  # the partial handed to the event loop and written out
}
BEHIND = ("idle", "request", "prefetch", "background")
KEEP = 4096  # waits kept per kind for the medians (a long session keeps the most recent)


@dataclass
class Timeline:
    """The moments (``time.perf_counter()`` seconds) one request has reached so far. Marks come from
    the loop and the model thread; each is set once (the first time it happens)."""

    at: dict[str, float] = field(default_factory=dict)
    behind: str | None = None  # what held the model thread when the request became ready
    steps_to_visible: int | None = None  # tokens generated until the first that showed text
    # Decode forwards run before that token was chosen (steps_to_visible - 1 without the engine's trail:
    # each healing token that shows nothing costs one; the trail's tokens none). None: not counted.
    forwards_to_visible: int | None = None

    @classmethod
    def starting_now(cls) -> Timeline:
        t = cls()
        t.mark("arrived")
        return t

    def mark(self, name: str) -> None:
        self.at.setdefault(name, time.perf_counter())

    def ms(self, start: str, end: str) -> float | None:
        a, b = self.at.get(start), self.at.get(end)
        return None if a is None or b is None else (b - a) * 1000.0

    def phases(self) -> dict[str, float]:
        """Milliseconds of each phase both of whose marks were reached, and ``first_visible`` (arrival
        to the first partial with new text written out) when that happened."""
        out = {}
        for prev, mark in zip(MARKS, MARKS[1:], strict=False):
            ms = self.ms(prev, mark)
            if ms is not None:
                out[PHASES[mark]] = ms
        first = self.ms("arrived", "sent")
        if first is not None:
            out["first_visible"] = first
        after = self.ms("sent", "decoded_on")
        if after is not None:  # >= 0: that partial was out before the next token was chosen
            out["sent_before_next_token"] = after
        return out


def percentiles(values: list[float]) -> dict[str, float]:
    """count, median, p95 (nearest rank) and max of ``values``; only count when there are none."""
    v = sorted(values)
    if not v:
        return {"count": 0}
    p95 = v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]
    mid = len(v) // 2
    median = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return {"count": len(v), "median_ms": median, "p95_ms": p95, "max_ms": v[-1]}


@dataclass
class WaitStats:
    """Requests' waits for the model thread (ready -> started), by what held it when they became ready."""

    waits: dict[str, deque[float]] = field(default_factory=lambda: {b: deque(maxlen=KEEP) for b in BEHIND})
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BEHIND, 0))

    def note(self, behind: str, ms: float) -> None:
        self.counts[behind] += 1
        self.waits[behind].append(ms)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {b: {**percentiles(list(self.waits[b])), "count": self.counts[b]} for b in BEHIND}
