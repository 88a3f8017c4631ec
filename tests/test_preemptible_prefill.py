"""Preemptible prefill (work ahead of a request): it stops between pieces when told to, keeps what it
did, resumes from there, and never changes a suggestion."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import REPO
from test_state_reuse import BUDGET, TRACES, replay

from granite_lsp.engine import Engine
from granite_lsp.state_cache import StateCache

TASKS = REPO / "model" / "corpus" / "tasks.py"


def _yield_after(n: int):
    """A should_yield that says yes after ``n`` pieces, and counts the pieces it was asked about."""
    asked = [0]

    def should_yield() -> bool:
        asked[0] += 1
        return asked[0] >= n

    return should_yield, asked


def _prompt(make_service, cursor_text: str = "def render"):
    svc = make_service(**BUDGET)
    text = TASKS.read_text()
    return svc, text, text.index(cursor_text)


def test_an_interrupted_prefill_resumes_where_it_stopped(make_service) -> None:
    svc, text, cursor = _prompt(make_service)
    prompt = svc.document("d").builder.build(text, cursor)
    cache = StateCache(svc.loaded.model, chunk=16, max_bytes=1 << 40)
    engine = Engine(svc.loaded.tokenizer, cache)
    n = len(prompt.ids)
    assert n > 100
    done, runs = 0, 0
    while True:
        should_yield, asked = _yield_after(2)
        pre = engine.prefill_ahead("d", prompt, should_yield)
        runs += 1
        assert pre.reused_tokens == done  # resumed exactly where the previous one stopped: nothing redone
        assert pre.processed_tokens <= 2 * cache.chunk  # stopped within a piece of being asked to
        done += pre.processed_tokens
        if pre.complete:
            break
        assert asked[0] == 2
    assert done == n and runs >= n // (2 * cache.chunk)
    assert cache.stats.yields == runs - 1
    # Each resumed prefill dropped the checkpoint it resumed from: none of them is left.
    assert not any(c.resume for c in cache.checkpoints)
    # The request that follows costs nothing, and its logits are those of an uninterrupted prefill
    # (to rounding: a forward cut elsewhere sums in another order, as any checkpoint restore does;
    # the suggestions are compared exactly below).
    after = cache.prefill("d", prompt.ids)
    assert after.processed_tokens == 0 and after.complete
    whole = StateCache(svc.loaded.model).prefill("d", prompt.ids)
    assert torch.allclose(after.logits, whole.logits, rtol=1e-4, atol=1e-4)
    assert int(after.logits.argmax()) == int(whole.logits.argmax())


def test_a_prefill_not_asked_to_yield_runs_to_the_end(make_service) -> None:
    svc, text, cursor = _prompt(make_service)
    prompt = svc.document("d").builder.build(text, cursor)
    cache = StateCache(svc.loaded.model, chunk=16)
    should_yield, asked = _yield_after(10**9)
    pre = Engine(svc.loaded.tokenizer, cache).prefill_ahead("d", prompt, should_yield)
    assert pre.complete and pre.processed_tokens == len(prompt.ids)
    # asked between pieces, never after the last one (there is nothing left to yield from)
    assert asked[0] == (len(prompt.ids) - 1) // cache.chunk


def test_a_requests_prefill_looks_whether_it_is_wanted_every_interval(make_service) -> None:
    """A request's prefill is cut into pieces of at most the cache's interval (StateCache.request_chunk,
    one value with the interval checkpoints' spacing), whether reuse is on or off: a request made stale
    stops within one piece. Here reuse is off (no interval checkpoints) and the interval 64."""
    svc, text, cursor = _prompt(make_service)
    prompt = svc.document("d").builder.build(text, cursor)
    cache = StateCache(svc.loaded.model, enabled=False, interval=64)
    assert cache.request_chunk == 64 and len(prompt.ids) > 4 * 64
    at: list[int] = []  # where the prefill was each time it looked

    def cancelled() -> bool:
        at.append(cache.live.pos)
        return False

    pre = Engine(svc.loaded.tokenizer, cache).prefill_request("d", prompt, cancelled)
    assert pre.complete and pre.processed_tokens == len(prompt.ids)
    pieces = [b - a for a, b in zip([0, *at], [*at, len(prompt.ids)], strict=True)]
    assert sum(pieces) == len(prompt.ids) and max(pieces) <= 64 and len(at) >= (len(prompt.ids) - 1) // 64


@pytest.mark.parametrize("trace_name", ["type_short.jsonl"])
def test_interrupted_work_ahead_never_changes_a_suggestion(make_service, trace_name: str) -> None:
    """Before every request of a typing trace, work ahead on its prompt is interrupted after a random
    number of pieces (seeded); the suggestion is the one computed from scratch, every step."""
    trace = [json.loads(line) for line in (TRACES / trace_name).read_text().splitlines()]
    ahead = make_service(**BUDGET)
    ahead.cache.chunk = 8
    scratch = make_service(**BUDGET, reuse=False)
    rng = random.Random(15)
    mismatches: list[int] = []
    resumed: list[int] = []
    steps = [0]

    def check(uri: str, text: str, cursor: int) -> None:
        steps[0] += 1
        prompt = ahead.document(uri).builder.build(text, cursor)  # what the request will build too
        should_yield, _ = _yield_after(rng.randint(1, 3))
        pre = ahead.engine.prefill_ahead(uri, prompt, should_yield)
        a = ahead.complete(uri, text, cursor)
        b = scratch.complete(uri, text, cursor)
        if not pre.complete:
            resumed.append(a.generation.stats.reused_tokens - pre.reused_tokens - pre.processed_tokens)
        if a.generation.token_ids != b.generation.token_ids:
            mismatches.append(steps[0])

    replay(trace, check)
    assert steps[0] > 50
    assert mismatches == [], f"work ahead changed the completion at steps {mismatches}"
    # some were interrupted, and each request resumed at or after where its work ahead stopped
    assert resumed and min(resumed) >= 0, resumed


@pytest.mark.parametrize("lines", [-5, -3, 4])
def test_a_jump_straight_back_costs_nothing(make_service, lines: int) -> None:
    """Back at the cursor the user left, the prompt is the one it had (not one anchored where the user
    jumped to, which a jump a few lines up would otherwise keep), so its checkpoints serve it whole."""
    svc, text, cursor = _prompt(make_service)
    cursor = text.index("\n", cursor) + 5  # typing on the line below "def render"
    first = svc.complete("d", text, cursor)
    starts = [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    here = text[:cursor].count("\n")
    there = starts[min(len(starts) - 1, here - 1 + lines)]  # the start of a line ``lines`` away
    assert text[:there].count("\n") != here
    svc.complete("d", text, there)
    back = svc.complete("d", text, cursor)
    assert back.generation.stats.processed_tokens == 0
    assert back.generation.token_ids == first.generation.token_ids
