"""Speculative decoding: drafts from the prompt (speculate.py), verified in one journaled forward and
rolled back to the rows the model agreed with (runtime/state.py's Journal). The output must be the
same token ids as plain greedy decoding, on every tiny-model fixture, on every decode path (torch
matmuls, torch ops, the packed CPU kernels) at every ISA level this CPU has (conftest's isa_level).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY, load_fixtures
from torch import Tensor

from granite_lsp import kernels
from granite_lsp.documents import Document
from granite_lsp.runtime import HybridModel, Interrupted, ModelState
from granite_lsp.runtime.rows import fork_row, step_rows
from granite_lsp.speculate import MAX_DRAFT, DraftBudget, PromptLookup, VerifyCost

pytestmark = pytest.mark.usefixtures("isa_level")

TOL = 1e-4  # the runtime's tolerance against transformers (tests/test_runtime.py)


def same(a: torch.Tensor, b: torch.Tensor, path: str) -> bool:
    """Equal on the packed kernels (a verify's rows there are computed as the steps' are: measured 0.0
    apart), within TOL on the torch paths (a batched matmul sums in another order than a one-row one)."""
    return torch.equal(a, b) if path == "packed-kernels" else (a - b).abs().max().item() < TOL


PATHS = ["torch-matmuls", "torch-ops", "packed-kernels"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(path: str) -> HybridModel:
    """model/tiny on one decode path: the packed CPU kernels (the CPU default), torch matmuls (the GPU
    path), or torch ops throughout (no fused mixer, attention or one-call step)."""
    packed = path == "packed-kernels"
    if packed and not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.build_error()}")
    model = HybridModel.from_pretrained(TINY, packed=packed)
    if path == "torch-ops":
        model.fused_step = False
        for blk in model.blocks:
            blk.mixer.fused = False
    return model


# -- drafts -------------------------------------------------------------------------------------
def test_prompt_lookup_proposes_what_followed_the_last_ngram() -> None:
    look = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], never={8})
    for t in (1, 2, 3):
        look.append(t)
    # "1 2 3" occurred at the start: what followed it, up to the limit
    assert look.propose(3) == [4, 5, 9]
    look.append(4)
    # "2 3 4" occurred once
    assert look.propose(2) == [5, 9]
    look.append(6)
    assert look.propose() == []  # "3 4 6" and "4 6" never occurred
    look.append(2)
    look.append(3)
    # "6 2 3" never, "2 3" three times before the end: the most recent one (the generated "2 3 4 6")
    assert look.propose() == [4, 6, 2, 3]
    assert look.propose(0) == []


def test_prompt_lookup_stops_before_a_stop_token() -> None:
    look = PromptLookup([5, 6, 7, 0, 8, 5, 6], never={0})
    assert look.propose() == [7]  # "5 6" -> 7, then the stop id 0 ends the draft
    look.append(7)
    assert look.propose() == []  # "6 7" -> 0: a draft of nothing


def test_draft_budget_grows_on_agreement_and_backs_off_on_misses() -> None:
    b = DraftBudget()
    start = b.next()
    b.update(start, start)  # all accepted: twice as many next time
    assert b.next() == min(MAX_DRAFT, 2 * start)
    b.update(b.length, 2)  # cut short after two: one more than were accepted
    assert b.next() == 3
    b.update(3, 0)  # nothing accepted: the next lookup is left out, then 2, then 4 ...
    assert [b.next() for _ in range(2)] == [0, 1]
    b.update(1, 0)
    assert [b.next() for _ in range(3)] == [0, 0, 1]
    b.update(1, 1)  # accepted again: no more skipping
    assert b.next() == 2


def test_verify_cost_feeds_drafts_only_where_they_pay() -> None:
    cheap = VerifyCost()
    cheap.observe_step(10.0)
    for _ in range(20):
        cheap.observe_verify(MAX_DRAFT, MAX_DRAFT, 12.0)  # cheap rows, every draft accepted
    assert cheap.limit() == MAX_DRAFT
    dear = VerifyCost()
    dear.observe_step(10.0)
    for k in range(1, MAX_DRAFT + 1):
        dear.observe_verify(k, 0, 10.0 * (2.0 + k))  # a model like tiny's: a verify costs several steps
    tries = []
    for _ in range(1000):
        tries.append(dear.limit())
        if tries[-1]:
            dear.observe_verify(tries[-1], 0, 30.0)  # the draft it tried is refused, at the same cost
    # nothing is worth it: a single draft now and then, costing at most EXPLORE_COST of the steps
    assert set(tries) == {0, 1} and 0 < tries.count(1) * (dear.ratio[1] - 1) <= 1000 * 0.011


class AlwaysDraft(VerifyCost):
    """Drafts whatever they cost (the tiny model's verifies cost several steps: VerifyCost would
    rightly stop drafting there, and these tests are about the output, not the speed)."""

    def limit(self) -> int:
        return MAX_DRAFT


# -- rollback in the runtime ----------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_keeping_any_rows_of_a_verify_equals_feeding_just_them(path: str) -> None:
    """A verify of 1 + MAX_DRAFT rows, then keep(n) for every n (the first row always stays): state,
    logits and the decoding that follows are those of feeding the first n tokens one at a time."""
    model = tiny_model(path)
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (37,), generator=gen)
    fed = torch.randint(0, vocab, (1 + MAX_DRAFT,), generator=gen)
    after = torch.randint(0, vocab, (3,), generator=gen)
    for n in range(1, len(fed) + 1):
        spec, plain = model.new_state(8), model.new_state(8)  # small: the KV buffers grow
        base = model.forward(prompt, spec)
        assert torch.equal(base, model.forward(prompt, plain))
        spec.journal_next()
        rows = model.forward(fed, spec, all_logits=True)
        model.keep(spec, n)
        want = base
        for t in fed[:n]:
            want = model.forward(t.view(1), plain)
        got = rows[n - 1]
        assert spec.pos == plain.pos == spec.kv.length == len(prompt) + n
        assert same(got, want, path), n
        for a, b in zip((*spec.kv.k, *spec.kv.v), (*plain.kv.k, *plain.kv.v), strict=True):
            assert same(a[:, : spec.pos], b[:, : plain.pos], path), n
        # on the kernels the kept rows after the first are deferred (ModelState.deferred): the first step
        # after applies them on its way, and the states are the plain ones from there on
        assert spec.deferred == (n - 1 if path == "packed-kernels" else 0), n
        for t in after:  # decoding goes on alike
            x, y = model.forward(t.view(1), spec), model.forward(t.view(1), plain)
            assert same(x, y, path) and int(x.argmax()) == int(y.argmax()), n
        assert spec.deferred == 0
        for a, b in zip((*spec.conv, *spec.ssm), (*plain.conv, *plain.ssm), strict=True):
            assert same(a, b, path), n


def test_keep_needs_the_journaled_forward_just_before() -> None:
    model = tiny_model("torch-matmuls")
    state = model.new_state(8)
    model.forward(torch.tensor([1, 2, 3]), state)
    with pytest.raises(ValueError, match="journaled"):
        model.keep(state, 1)  # that forward was not journaled
    state.journal_next()
    model.forward(torch.tensor([4, 5]), state, all_logits=True)
    with pytest.raises(ValueError, match="cannot keep 3"):
        model.keep(state, 3)
    with pytest.raises(ValueError, match="cannot keep 0"):
        model.keep(state, 0)  # the fed token is never taken back
    model.keep(state, 1)
    assert state.pos == 4
    with pytest.raises(ValueError, match="journaled"):
        model.keep(state, 1)  # a journal applies once


def _deferring(model: HybridModel, keep: int | None) -> tuple[ModelState, ModelState, Tensor]:
    """A state whose last one-call verify (6 rows) kept ``keep`` of them, leaving those after the first
    deferred (or, with None, was not taken back at all: its journal still open), and a state fed the same
    tokens one at a time; and the verify's rows' tokens."""
    gen = torch.Generator().manual_seed(21)
    vocab = model.config.vocab_size
    prompt, fed = torch.randint(0, vocab, (30,), generator=gen), torch.randint(0, vocab, (6,), generator=gen)
    spec, plain = model.new_state(8), model.new_state(8)
    model.forward(prompt, spec)
    model.forward(prompt, plain)
    spec.journal_next()
    model.forward(fed, spec, all_logits=True)
    if keep is not None:
        model.keep(spec, keep)
        assert spec.deferred == keep - 1  # the first row went into the state
    for t in fed[: len(fed) if keep is None else keep]:
        model.forward(t.view(1), plain)
    return spec, plain, fed


def _assert_same_states(a: ModelState, b: ModelState) -> None:
    assert a.pos == b.pos == a.kv.length == b.kv.length
    for x, y in zip((*a.conv, *a.ssm), (*b.conv, *b.ssm), strict=True):
        assert torch.equal(x, y)
    for x, y in zip((*a.kv.k, *a.kv.v), (*b.kv.k, *b.kv.v), strict=True):
        assert torch.equal(x[:, : a.pos], y[:, : b.pos])


def test_deferred_rows_are_settled_wherever_the_live_states_are_read() -> None:
    """A one-call verify's kept rows are deferred (ModelState.deferred): the live SSM states have not
    advanced over them. Every reader of the live states other than the next one-call forward settles
    them first, and gets exactly the states that feeding the tokens one at a time leaves: a snapshot,
    a fork, the candidates' forks and batched step (runtime/rows.py), a forward the one-call step does
    not take (> 16 tokens), a forward journaled whole and undone, a restore; a verify nobody took back
    keeps all its rows, whether a snapshot or the next forward comes first."""
    model = tiny_model("packed-kernels")
    tail = torch.tensor([5, 9, 2])

    spec, plain, _ = _deferring(model, 2)
    snap = spec.snapshot()  # settles
    assert spec.deferred == 0
    for x, y in zip((*snap.conv, *snap.ssm), (*plain.conv, *plain.ssm), strict=True):
        assert torch.equal(x, y)
    _assert_same_states(spec, plain)

    spec, plain, _ = _deferring(model, 3)
    forked = spec.fork()
    _assert_same_states(forked, plain)

    spec, plain, _ = _deferring(model, 3)
    long = torch.arange(20) % model.config.vocab_size  # more than GEMV_MAX_ROWS: layer by layer
    assert torch.equal(model.forward(long, spec, all_logits=True), model.forward(long, plain, all_logits=True))
    _assert_same_states(spec, plain)

    spec, plain, _ = _deferring(model, 4)
    before_nbytes = spec.nbytes
    rows = [fork_row(spec, 4), None]
    mirror = [fork_row(plain, 4), None]
    _assert_same_states(rows[0], mirror[0])
    got = step_rows(model, [7, 8], [rows[0], spec])
    want = step_rows(model, [7, 8], [mirror[0], plain])
    assert torch.equal(got, want)
    _assert_same_states(spec, plain)
    assert before_nbytes == spec.nbytes > plain.nbytes  # the scan-row buffers count

    spec, plain, _ = _deferring(model, 2)
    spec.journal_next(whole=True)  # the forward settles as it begins: undo brings back the states there
    model.forward(tail, spec)
    spec.undo()
    _assert_same_states(spec, plain)

    spec, plain, _ = _deferring(model, 5)
    model.forward(tail, spec)  # the one-call step applies them on its way
    model.forward(tail, plain)
    _assert_same_states(spec, plain)

    spec, plain, _ = _deferring(model, 2)
    spec.restore(snap)  # a restore replaces them
    assert spec.deferred == 0 and spec.pos == snap.pos

    spec, plain, fed = _deferring(model, None)  # never taken back: all six rows stay
    spec.snapshot()
    _assert_same_states(spec, plain)
    with pytest.raises(ValueError, match="journaled"):
        model.keep(spec, 1)  # the snapshot closed the verify

    spec, plain, fed = _deferring(model, None)
    x, y = model.forward(tail, spec), model.forward(tail, plain)
    assert torch.equal(x, y)
    _assert_same_states(spec, plain)


@pytest.mark.parametrize("path", PATHS)
def test_a_forward_journaled_whole_is_undone_even_midway(path: str) -> None:
    """A forward journaled whole (a piece of background work) is taken back by ``undo``, finished or
    stopped between two layers: the Mamba states are bit for bit those before it, the KV continues from
    its start, and decoding from there equals decoding from a state that never ran it."""
    model = tiny_model(path)
    prompt, piece, after, state, plain, before = _prompted_twice(model, 11, 20)

    def stop(done: int, layers: int) -> bool:
        return done == 2  # after two of the four layers

    for interrupt in (None, stop):
        state.journal_next(whole=True)
        if interrupt is None:
            model.forward(piece, state)
            assert state.pos == len(prompt) + len(piece)
        else:
            with pytest.raises(Interrupted):
                model.forward(piece, state, interrupt=interrupt)  # 20 tokens: layer by layer, interruptible
        with pytest.raises(ValueError, match="journaled by rows"):
            model.keep(state, 1)
        state.undo()
        _assert_back_at(state, len(prompt), before)
        with pytest.raises(ValueError, match="journaled whole"):
            state.undo()  # once
    _assert_decodes_alike(model, state, plain, after, path)


@pytest.mark.parametrize("path", PATHS)
def test_a_forward_journaled_whole_is_undone_from_a_later_piece(path: str) -> None:
    """A forward journaled whole and longer than ``prefill_piece`` runs in pieces, each advancing the
    position: stopped in its second piece it is undone all the same (states bit for bit those before
    it, the KV back at its start), and decoding from there equals a state that never ran it."""
    model = tiny_model(path)
    model.prefill_piece = 20  # > GEMV_MAX_ROWS: a piece runs layer by layer and can stop
    prompt, piece, after, state, plain, before = _prompted_twice(model, 12, 50)
    looks = []

    def stop(done: int, layers: int) -> bool:
        looks.append(state.pos)
        return len(looks) == layers + 1  # the first piece whole, the second after two layers

    state.journal_next(whole=True)
    with pytest.raises(Interrupted):
        model.forward(piece, state, interrupt=stop)
    assert state.pos == len(prompt) + 20 and looks[-1] == state.pos
    state.undo()
    _assert_back_at(state, len(prompt), before)
    _assert_decodes_alike(model, state, plain, after, path)


def _prompted_twice(
    model: HybridModel, seed: int, piece_len: int
) -> tuple[Tensor, Tensor, Tensor, ModelState, ModelState, list[Tensor]]:
    """The undo tests' setup: a 29-token prompt, a piece of ``piece_len`` tokens, 3 tokens to decode
    after it; two states that both ran the prompt (one to journal the piece on and undo it, one that
    never runs it); and the first one's Mamba states before the piece."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt, piece, after = (torch.randint(0, vocab, (n,), generator=gen) for n in (29, piece_len, 3))
    state, plain = model.new_state(8), model.new_state(8)
    model.forward(prompt, state)
    model.forward(prompt, plain)
    return prompt, piece, after, state, plain, [t.clone() for t in (*state.conv, *state.ssm)]


def _assert_back_at(state: ModelState, pos: int, before: list[Tensor]) -> None:
    """The undone state: at ``pos`` (its KV too), its Mamba states bit for bit ``before``."""
    assert state.pos == state.kv.length == pos
    for a, b in zip(before, (*state.conv, *state.ssm), strict=True):
        assert torch.equal(a, b)


def _assert_decodes_alike(model: HybridModel, state: ModelState, plain: ModelState, after: Tensor, path: str) -> None:
    """Decoding ``after`` from ``state`` gives what it gives from ``plain`` (a state that never ran the piece)."""
    for t in after:
        x, y = model.forward(t.view(1), state), model.forward(t.view(1), plain)
        assert same(x, y, path)


# -- the engine: same output with and without speculation ------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    """The tiny model as the server loads it: the packed kernels, the one path the service speculates
    on (test_the_service_speculates_and_batches_rows_only_where_exact)."""
    if not tiny_loaded.model.packed:
        pytest.skip("kernels unavailable")
    return tiny_loaded


def _service(loaded, **options):
    from granite_lsp.service import CompletionService
    from granite_lsp.settings import Settings

    return CompletionService(loaded, Settings().updated({"model": str(TINY), "typeThrough": False, **options}))


def _complete(svc, fx: dict, uri: str, **kw):
    cursor = Document("x", fx["text"]).offset_at(fx["line"], fx["character"])
    return svc.complete(uri, fx["text"], cursor, shape=False, **kw).generation


def test_every_fixture_decodes_the_same_tokens_with_speculation(loaded) -> None:
    # Each fixture is asked twice from the same prompt: the second would take tokens from the first's
    # trail (engine.py; test_trail.py) with fewer forwards. Here: speculation against plain steps alone.
    on, off = _service(loaded, trail=False), _service(loaded, speculate=False, trail=False)
    assert on.engine.speculate and not off.engine.speculate
    on.engine.costs = AlwaysDraft()
    accepted = forwards = 0
    for i, fx in enumerate(load_fixtures()):
        for max_tokens in (96, 5):  # to the end of the middle, and cut by maxTokens inside a verify
            a = _complete(on, fx, f"file:///{i}.py", max_tokens=max_tokens)
            b = _complete(off, fx, f"file:///{i}.py", max_tokens=max_tokens)
            assert (a.token_ids, a.text, a.stop_reason) == (b.token_ids, b.text, b.stop_reason), (i, max_tokens)
            # the live state consumed exactly the same tokens (the next request reuses it)
            assert on.cache.live_tokens == off.cache.live_tokens
            accepted += a.stats.accepted_tokens
            forwards += a.stats.decode_forwards
            assert b.stats.draft_tokens == 0 and b.stats.decode_forwards == len(b.token_ids) - (b.stop_reason != "eos")
    assert accepted > 0  # drafts were accepted somewhere: the verify path ran, not just plain steps


def test_the_trail_and_drafts_together_decode_the_same_tokens_as_plain_steps(loaded) -> None:
    """Asked twice from the same prompt, the second generation follows the first's trail (up to
    TRAIL_ROWS tokens, no forward) and then feeds those tokens, the next one and the drafts in one
    forward: more than the one-call step's 16 rows would run the prefill path (another rounding), so
    that forward is capped. Every answer equals plain steps' without the trail, token for token."""
    on, off = _service(loaded, trail=True), _service(loaded, speculate=False, trail=False)
    on.engine.costs = AlwaysDraft()
    verify, feed, widths, fed = on.cache.verify, on.cache.feed, [], []

    def counted(ids: list[int]):  # the real verify, its width seen
        widths.append(len(ids))
        return verify(ids)

    def counted_feed(ids: list[int]):  # trail tokens and the next one, no drafts: unjournaled
        fed.append(len(ids))
        return feed(ids)

    on.cache.verify, on.cache.feed = counted, counted_feed
    trail = 0
    for i, fx in enumerate(load_fixtures()):
        b = _complete(off, fx, f"file:///{i}.py", max_tokens=96)
        for _ in range(2):
            a = _complete(on, fx, f"file:///{i}.py", max_tokens=96)
            assert (a.token_ids, a.text, a.stop_reason) == (b.token_ids, b.text, b.stop_reason), i
            trail += a.stats.trail_tokens
    assert trail > 0 and fed  # the second asks walked the trail, and fed its tokens without a journal
    # forwards filled to the one-call step's rows, never past them
    assert max(widths + fed) == kernels.GEMV_MAX_ROWS


@pytest.mark.parametrize("path", PATHS)
def test_the_service_speculates_and_batches_rows_only_where_exact(tiny_loaded, path: str) -> None:
    """Verified and batched rows equal single steps bit for bit only on the packed kernels; on the torch
    paths (GPU, MPS) they differ by a few 1e-6, so there the service decodes one token at a time and
    one candidate, and its output stays the single greedy answer."""
    exact = path == "packed-kernels"
    svc = _service(dataclasses.replace(tiny_loaded, model=tiny_model(path)))
    assert svc.engine.speculate == exact
    svc.engine.costs = AlwaysDraft()
    drafts = alternatives = 0
    for i, fx in enumerate(load_fixtures()):
        cursor = Document("x", fx["text"]).offset_at(fx["line"], fx["character"])
        one = svc.complete(f"file:///{i}.py", fx["text"], cursor, shape=False)
        drafts += one.generation.stats.draft_tokens
        several = svc.complete(f"file:///{i}.py", fx["text"], cursor, shape=False, candidates=3)
        alternatives += len(several.alternatives)
    assert svc.engine.speculate == exact  # each request applies the settings again: still decided so
    assert (drafts > 0, alternatives > 0) == (exact, exact)


class Oracle:
    """Drafts that follow the plain greedy output ``want`` and diverge at draft index ``wrong`` (never,
    when ``wrong`` >= MAX_DRAFT): every verify then accepts exactly min(wrong, drafts) tokens."""

    def __init__(self, want: list[int], wrong: int, vocab: int, stop: frozenset[int]):
        self.want, self.wrong, self.vocab, self.stop = want, wrong, vocab, stop
        self.generated = 0
        self.proposed: list[list[int]] = []

    def __call__(self, prompt: list[int], stop_ids: frozenset[int]) -> Oracle:
        self.generated = 0
        return self

    def append(self, token: int) -> None:
        assert token == self.want[self.generated]
        self.generated += 1

    def propose(self, limit: int = MAX_DRAFT) -> list[int]:
        draft = list(self.want[self.generated : self.generated + limit])
        if self.wrong < len(draft):
            bad = (draft[self.wrong] + 1) % self.vocab
            while bad in self.stop or bad == draft[self.wrong]:
                bad = (bad + 1) % self.vocab
            draft[self.wrong] = bad
        self.proposed.append(draft)
        return draft


@pytest.mark.parametrize("wrong", range(MAX_DRAFT + 1))
def test_drafts_rejected_at_every_position_change_nothing(loaded, wrong: int) -> None:
    """Forced drafts that diverge at each position 0..k (k + 1: all right): the tokens are the plain
    ones, and the model accepted exactly the drafts before the wrong one."""
    fx = max(load_fixtures(), key=lambda f: len(f["middle"]))
    off = _service(loaded, speculate=False, reuse=False)
    want = _complete(off, fx, "file:///w.py", max_tokens=96)
    on = _service(loaded, reuse=False)
    oracle = Oracle(want.token_ids, wrong, len(on.loaded.tokenizer.token_bytes), on.loaded.tokenizer.control.stop_ids)
    on.engine.drafts = oracle
    on.engine.costs = AlwaysDraft()
    got = _complete(on, fx, "file:///w.py", max_tokens=96)
    assert (got.token_ids, got.text, got.stop_reason) == (want.token_ids, want.text, want.stop_reason)
    assert got.stats.draft_tokens == sum(len(d) for d in oracle.proposed)
    assert got.stats.accepted_tokens == sum(min(wrong, len(d)) for d in oracle.proposed)
    # each forward yields its token plus the drafts accepted (the last token's forward only if it was eos)
    assert got.stats.decode_forwards + got.stats.accepted_tokens == len(want.token_ids) - (want.stop_reason != "eos")


@pytest.mark.slow
def test_real_shape_random_weights_decodes_the_same_tokens_with_speculation() -> None:
    """Granite-4.0-H-350M's shape with random weights in bfloat16 (the packed kernels' path the bench
    measures): drafts looked up in the prompt, and forced drafts diverging at 0, 3 and never, give the
    tokens of plain decoding."""
    from granite_lsp.bench.shape import REAL_CONFIG
    from granite_lsp.service import load
    from granite_lsp.settings import Settings

    torch.set_num_threads(2)
    real = load(
        Settings().updated(
            {"model": str(TINY), "randomWeights": str(REAL_CONFIG), "dtype": "bfloat16", "device": "cpu"}
        )
    )
    fx = max(load_fixtures(), key=lambda f: len(f["text"]))
    off = _service(real, speculate=False, reuse=False)
    want = _complete(off, fx, "file:///r.py", max_tokens=16, ignore_eos=True)
    assert len(want.token_ids) == 16
    on = _service(real, reuse=False)
    on.engine.costs = AlwaysDraft()
    got = _complete(on, fx, "file:///r.py", max_tokens=16, ignore_eos=True)
    assert got.token_ids == want.token_ids
    for wrong in (0, 3, MAX_DRAFT):
        stop = on.loaded.tokenizer.control.stop_ids
        on.engine.drafts = Oracle(want.token_ids, wrong, len(on.loaded.tokenizer.token_bytes), stop)
        got = _complete(on, fx, "file:///r.py", max_tokens=16, ignore_eos=True)
        assert got.token_ids == want.token_ids, wrong
        assert got.stats.draft_tokens > 0 and (got.stats.accepted_tokens > 0) == (wrong > 0)


class Recorded(AlwaysDraft):
    """AlwaysDraft keeping each verify's cost as the engine measured it."""

    def __init__(self) -> None:
        super().__init__()
        self.verifies: list[float] = []

    def observe_verify(self, drafted: int, accepted: int, ms: float) -> None:
        self.verifies.append(ms)
        super().observe_verify(drafted, accepted, ms)


def test_a_slow_on_text_is_not_counted_in_a_verifys_cost(loaded, monkeypatch) -> None:
    """VerifyCost compares a verify with a plain step's bare forward, so choosing the tokens a verify
    yields and on_text after each (shaping, partial notifications, the early line's handover) must not
    count in it (they did: it was timed from the feed to the rollback). Every on_text here moves the
    engine's clock on by an hour instead of sleeping: no verify's measured cost may include one."""
    import types

    from granite_lsp import engine as engine_module

    hour_ms, ahead = 3_600_000.0, [0.0]
    real = engine_module.time.perf_counter
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=lambda: real() + ahead[0]))

    def slow(progress) -> None:
        ahead[0] += hour_ms / 1000.0

    fx = max(load_fixtures(), key=lambda f: len(f["middle"]))
    want = _complete(_service(loaded, speculate=False, reuse=False), fx, "file:///s.py", max_tokens=96)
    on = _service(loaded, reuse=False)
    tokenizer = on.loaded.tokenizer
    on.engine.drafts = Oracle(want.token_ids, MAX_DRAFT, len(tokenizer.token_bytes), tokenizer.control.stop_ids)
    on.engine.costs = costs = Recorded()
    got = _complete(on, fx, "file:///s.py", max_tokens=96, on_progress=slow)
    assert got.token_ids == want.token_ids and got.stats.accepted_tokens > 0  # verifies ran, drafts kept
    assert ahead[0] * 1000.0 >= hour_ms * len(got.token_ids)  # on_text ran after every token
    assert costs.verifies and all(0.0 < ms < hour_ms for ms in costs.verifies), costs.verifies
