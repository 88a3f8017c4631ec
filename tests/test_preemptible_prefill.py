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


def _interrupt_after(n: int):
    """An interrupt that says a request waits from its ``n``-th look on (between two layers)."""
    looks = [0]

    def interrupt() -> bool:
        looks[0] += 1
        return looks[0] >= n

    return interrupt, looks


def _mamba_state(cache: StateCache) -> list[torch.Tensor]:
    return [t.clone() for t in (*cache.live.conv, *cache.live.ssm)]


def test_a_piece_interrupted_between_layers_is_abandoned_to_its_start(make_service) -> None:
    """A request comes while a piece runs (finish_ms 0: abandon whatever is left; pieces of more than
    GEMV_MAX_ROWS tokens, which run layer by layer, not in one call): the prefill stops
    within a layer, the live state is exactly the one of a prefill told to yield before that piece (same
    Mamba states bit for bit, same position and tokens), a checkpoint is kept there, and the next
    prefill resumes from it to the logits of a prefill never interrupted."""
    svc, text, cursor = _prompt(make_service)
    prompt = svc.document("d").builder.build(text, cursor)
    model = svc.loaded.model
    layers = len(model.blocks)
    assert layers > 2
    cache = StateCache(model, chunk=32, max_bytes=1 << 40, finish_ms=0.0)
    interrupt, looks = _interrupt_after(2 * (layers - 1) + 3)  # two pieces whole, the third cut at a layer
    pre = cache.prefill("d", prompt.ids, should_yield=lambda: False, interrupt=interrupt)
    assert not pre.complete and pre.processed_tokens == 64 and pre.reused_tokens == 0
    assert looks[0] == 2 * (layers - 1) + 3  # it stopped at the first look that said so
    assert cache.stats.pieces_abandoned == 1 and cache.stats.abandoned_tokens == 32
    assert cache.stats.pieces_finished == 0 and cache.stats.yields == 1
    assert cache.live.pos == 64 and cache.live_tokens == prompt.ids[:64]
    assert [c.pos for c in cache.checkpoints if c.resume] == [64]
    _assert_taken_back_and_resumed(cache, pre, prompt.ids, chunk=32, pieces=2)


def _assert_taken_back_and_resumed(cache: StateCache, pre, ids: list[int], chunk: int, pieces: int) -> None:
    """After a piece was abandoned: the state is bit for bit that of the same pieces told to yield after
    ``pieces`` of them (no interrupt), and the prefill resumed to the end reuses those tokens, keeps no
    resume checkpoint and matches the uninterrupted prefill."""
    done = chunk * pieces
    plain = StateCache(cache.model, chunk=chunk, max_bytes=1 << 40)
    should_yield, _ = _yield_after(pieces)
    ref = plain.prefill("d", ids, should_yield=should_yield)
    assert ref.processed_tokens == done
    assert all(torch.equal(a, b) for a, b in zip(_mamba_state(cache), _mamba_state(plain), strict=True))
    assert torch.equal(pre.logits, ref.logits)
    after = cache.prefill("d", ids)
    assert after.reused_tokens == done and after.complete
    assert not any(c.resume for c in cache.checkpoints)
    whole = StateCache(cache.model).prefill("d", ids)
    assert torch.allclose(after.logits, whole.logits, rtol=1e-4, atol=1e-4)
    assert int(after.logits.argmax()) == int(whole.logits.argmax())


def test_a_piece_longer_than_the_models_prefill_piece_is_abandoned_from_a_later_forward_piece(
    make_service, monkeypatch
) -> None:
    """A prefill piece longer than the model's ``prefill_piece`` runs as several forward pieces
    (HybridModel._forward_pieces), each moving the live position on: cut in a later one, the piece is
    still taken back whole to its start (Mamba states bit for bit those of a prefill told to yield
    there), and the prefill resumes from there to the uninterrupted logits."""
    svc, text, cursor = _prompt(make_service)
    prompt = svc.document("d").builder.build(text, cursor)
    model = svc.loaded.model
    layers = len(model.blocks)
    assert layers > 2 and len(prompt.ids) > 2 * 96
    monkeypatch.setattr(model, "prefill_piece", 32)  # > GEMV_MAX_ROWS: layer by layer, interruptible
    cache = StateCache(model, chunk=96, max_bytes=1 << 40, finish_ms=0.0)
    # the first piece whole (3 forward pieces), then the second's first forward piece, and its second
    # forward piece cut at its second look: the live position is 96 + 32 when the piece is taken back
    interrupt, looks = _interrupt_after(4 * (layers - 1) + 2)
    pre = cache.prefill("d", prompt.ids, should_yield=lambda: False, interrupt=interrupt)
    assert looks[0] == 4 * (layers - 1) + 2
    assert not pre.complete and pre.processed_tokens == 96 and pre.reused_tokens == 0
    assert cache.stats.pieces_abandoned == 1 and cache.stats.abandoned_tokens == 96
    assert cache.live.pos == cache.live.kv.length == 96 and cache.live_tokens == prompt.ids[:96]
    assert [c.pos for c in cache.checkpoints if c.resume] == [96]
    _assert_taken_back_and_resumed(cache, pre, prompt.ids, chunk=96, pieces=1)


def test_a_piece_that_cannot_be_taken_back_leaves_the_empty_state(make_service, monkeypatch) -> None:
    """Should ``undo`` fail after an interrupted piece, the Mamba layers would be advanced to different
    tokens: the live state starts over from empty (as after a failed forward) and the error propagates."""
    svc, text, cursor = _prompt(make_service)
    prompt = svc.document("d").builder.build(text, cursor)
    cache = StateCache(svc.loaded.model, chunk=32, max_bytes=1 << 40, finish_ms=0.0)
    assert cache.prefill("d", prompt.ids[:64]).complete

    def broken() -> None:
        raise ValueError("undo failed")

    monkeypatch.setattr(cache.live, "undo", broken)
    interrupt, _ = _interrupt_after(3)
    with pytest.raises(ValueError, match="undo failed"):
        cache.prefill("d", prompt.ids, should_yield=lambda: False, interrupt=interrupt)
    assert cache.live.pos == 0 and cache.live_tokens == [] and cache.origin() is None
    monkeypatch.undo()
    after = cache.prefill("d", prompt.ids)
    whole = StateCache(svc.loaded.model).prefill("d", prompt.ids)
    assert after.complete and torch.allclose(after.logits, whole.logits, rtol=1e-4, atol=1e-4)


def test_an_abandoned_piece_keeps_the_checkpoint_it_started_from(make_service) -> None:
    """Abandoned, a piece leaves the live state exactly where it began: when that was a checkpoint's
    state, the cache still says so (``origin``), as the engine's trail needs."""
    svc, text, cursor = _prompt(make_service)
    prompt = svc.document("d").builder.build(text, cursor)
    assert len(prompt.ids) > 64 + 32
    cache = StateCache(svc.loaded.model, chunk=32, max_bytes=1 << 40, finish_ms=0.0)
    assert cache.prefill("d", prompt.ids[:64]).complete
    origin = cache.origin()
    assert origin is not None and origin.pos == 64
    interrupt, _ = _interrupt_after(3)  # the first piece after it, cut at a layer
    pre = cache.prefill("d", prompt.ids, should_yield=lambda: False, interrupt=interrupt)
    assert not pre.complete and cache.stats.pieces_abandoned == 1 and cache.live.pos == 64
    assert cache.origin() is origin


def test_a_piece_interrupted_near_its_end_finishes(make_service) -> None:
    """With what is left of a piece within finish_ms (here: any), a piece asked to stop finishes and
    the prefill yields right after it, keeping its work."""
    svc, text, cursor = _prompt(make_service)
    prompt = svc.document("d").builder.build(text, cursor)
    cache = StateCache(svc.loaded.model, chunk=32, max_bytes=1 << 40, finish_ms=float("inf"))
    interrupt, _ = _interrupt_after(1)  # as work ahead passes them: one signal, a request waits
    pre = cache.prefill("d", prompt.ids, should_yield=interrupt, interrupt=interrupt)
    assert not pre.complete and len(prompt.ids) > 32
    assert pre.processed_tokens == 32 and cache.stats.pieces_finished == 1 and cache.stats.yields == 1
    assert cache.stats.pieces_abandoned == 0


def test_a_first_piece_abandoned_from_the_empty_state_leaves_nothing(make_service) -> None:
    """Abandoned in its first piece from no tokens at all: nothing processed, no logits, no checkpoint,
    and the next prefill starts from zero and gets the uninterrupted logits exactly."""
    svc, text, cursor = _prompt(make_service)
    prompt = svc.document("d").builder.build(text, cursor)
    cache = StateCache(svc.loaded.model, chunk=32, max_bytes=1 << 40, finish_ms=0.0)
    interrupt, _ = _interrupt_after(1)
    pre = cache.prefill("d", prompt.ids, should_yield=lambda: False, interrupt=interrupt)
    assert not pre.complete and pre.processed_tokens == 0 and pre.logits.numel() == 0
    assert cache.checkpoints == [] and cache.live.pos == 0 and cache.live_tokens == []
    after = cache.prefill("d", prompt.ids)
    whole = StateCache(svc.loaded.model).prefill("d", prompt.ids)
    assert after.reused_tokens == 0 and torch.equal(after.logits, whole.logits)


@pytest.mark.parametrize("finish_ms", [0.0, float("inf")])
def test_work_ahead_interrupted_between_layers_never_changes_a_suggestion(make_service, finish_ms: float) -> None:
    """Before every request of a typing trace, work ahead on its prompt is interrupted between two
    layers after a random number of looks (seeded), its piece abandoned (finish_ms 0) or finished (inf);
    the suggestion is the one computed from scratch, every step."""
    trace = [json.loads(line) for line in (TRACES / "type_short.jsonl").read_text().splitlines()]
    ahead = make_service(**BUDGET)
    ahead.cache.chunk, ahead.cache.finish_ms = 24, finish_ms
    scratch = make_service(**BUDGET, reuse=False)
    layers = len(ahead.loaded.model.blocks)
    rng = random.Random(151)
    mismatches: list[int] = []
    steps = [0]

    def check(uri: str, text: str, cursor: int) -> None:
        steps[0] += 1
        prompt = ahead.document(uri).builder.build(text, cursor)
        interrupt, _ = _interrupt_after(rng.randint(1, 3 * layers))
        ahead.engine.prefill_ahead(uri, prompt, lambda: False, interrupt)
        a = ahead.complete(uri, text, cursor)
        b = scratch.complete(uri, text, cursor)
        if a.generation.token_ids != b.generation.token_ids:
            mismatches.append(steps[0])

    replay(trace, check)
    assert steps[0] > 50
    assert mismatches == [], f"work ahead changed the completion at steps {mismatches}"
    stats = ahead.cache.stats
    assert (stats.pieces_abandoned if finish_ms == 0.0 else stats.pieces_finished) > 0
    assert (stats.pieces_finished if finish_ms == 0.0 else stats.pieces_abandoned) == 0


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
