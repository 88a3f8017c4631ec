"""Several candidates per request: the batched decode step, the candidates it yields, the LSP answer.

The batched step's rows must be exactly what each sequence gets alone (logits bit for bit with the
kernels, at every ISA level this CPU has), the first candidate exactly the single answer of today, and
the alternatives distinct, non-empty greedy continuations of the next-best first tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, load_fixtures
from jsonrpc_client import RpcClient

from granite_lsp import kernels
from granite_lsp.candidates import generate_candidates, next_best
from granite_lsp.documents import Document
from granite_lsp.engine import Engine
from granite_lsp.fim import PromptBuilder
from granite_lsp.runtime import HybridModel
from granite_lsp.runtime.rows import step_rows
from granite_lsp.state_cache import StateCache


def _prompt_ids(tokenizer, fixture: dict) -> list[int]:
    cursor = Document("x", fixture["text"]).offset_at(fixture["line"], fixture["character"])
    return PromptBuilder(tokenizer).build(fixture["text"], cursor).ids


@pytest.mark.usefixtures("isa_level")
@pytest.mark.parametrize("one_call", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_batched_step_rows_equal_each_row_alone(tiny_loaded, dtype: str, one_call: bool) -> None:
    """Three sequences forked from one prompt (the second one token further on), each fed a different
    token and then its own greedy choice for 12 steps: batched and alone give the same tokens (and, with
    the kernels, logits and states), the batch in one kernels.decode_layers call (``one_call``, with one
    position per row) or layer by layer."""
    weights = torch.float32 if dtype == "int8" else getattr(torch, dtype)
    model = HybridModel.from_pretrained(TINY, dtype=weights, quantize="int8" if dtype == "int8" else None)
    model.fused_step = one_call
    ids = _prompt_ids(tiny_loaded.tokenizer, load_fixtures()[0])
    base = model.new_state()
    logits = model.forward(torch.tensor(ids), base)
    firsts = torch.topk(logits, 3).indices.tolist()
    batched = [base.fork() for _ in firsts]
    alone = [base.fork() for _ in firsts]
    for s in (batched[1], alone[1]):
        model.forward(torch.tensor([firsts[0]]), s)
    tokens_b, tokens_a = list(firsts), list(firsts)
    exact = model.packed and kernels.available()
    for _ in range(12):
        rows = step_rows(model, tokens_b, batched)
        singles = [model.forward(torch.tensor([t]), s) for t, s in zip(tokens_a, alone, strict=True)]
        for row, single in zip(rows, singles, strict=True):
            if exact:
                assert torch.equal(row, single)
            else:
                torch.testing.assert_close(row, single, rtol=1e-4, atol=1e-4)
        tokens_b = rows.argmax(-1).tolist()
        tokens_a = [int(s.argmax()) for s in singles]
        assert tokens_b == tokens_a
    assert [s.pos for s in batched] == [s.pos for s in alone] == [len(ids) + 12, len(ids) + 13, len(ids) + 12]
    if exact:
        for b, a in zip(batched, alone, strict=True):
            for x, y in zip((*b.conv, *b.ssm), (*a.conv, *a.ssm), strict=True):
                assert torch.equal(x, y)
            for x, y in zip((*b.kv.k, *b.kv.v), (*a.kv.k, *a.kv.v), strict=True):
                assert torch.equal(x[:, : a.pos], y[:, : a.pos])


def test_step_rows_refuses_states_sharing_a_kv_cache(tiny_loaded) -> None:
    model = tiny_loaded.model
    state = model.new_state()
    model.forward(torch.tensor([1, 2, 3]), state)
    with pytest.raises(ValueError, match="fork them first"):
        step_rows(model, [4, 5], [state, state])


def _service(make_service):
    return make_service(typeThrough=False, reuse=False)


@pytest.mark.usefixtures("isa_level")
@pytest.mark.parametrize("fixture", load_fixtures()[:6], ids=lambda f: f"{f['file']}:{f['line']}")
def test_first_candidate_is_the_single_answer(make_service, fixture: dict) -> None:
    cursor = Document("x", fixture["text"]).offset_at(fixture["line"], fixture["character"])
    one = _service(make_service).complete("file:///a.py", fixture["text"], cursor)
    many = _service(make_service).complete("file:///a.py", fixture["text"], cursor, candidates=4)
    assert many.generation.token_ids == one.generation.token_ids
    assert many.generation.stop_reason == one.generation.stop_reason
    assert many.suggestion == one.suggestion
    shown = [s for s in [many.suggestion, *many.alternatives] if s is not None]
    assert len({(s.text, s.replace) for s in shown}) == len(shown), "a duplicate was kept"
    assert all(s.text.strip() for s in many.alternatives)
    assert len(many.alternatives) <= 3


def test_alternatives_are_greedy_continuations_of_the_next_best_first_tokens(tiny_loaded) -> None:
    """Each alternative is what the model generates greedily when its first token is forced: checked
    against plain single-row forwards of the prompt followed by that token."""
    tokenizer = tiny_loaded.tokenizer
    fixture = next(f for f in load_fixtures() if f["character"] == 0)  # at a line start: nothing to heal
    cursor = Document("x", fixture["text"]).offset_at(fixture["line"], fixture["character"])
    prompt = PromptBuilder(tokenizer).build(fixture["text"], cursor)
    assert not prompt.heal
    engine = Engine(tokenizer, StateCache(tiny_loaded.model, enabled=False))
    gens = generate_candidates(engine, "d", prompt, 10, 3, ignore_eos=True)
    assert len(gens) == 3
    model = tiny_loaded.model
    state = model.new_state()
    logits = model.forward(torch.tensor(prompt.ids), state)
    firsts = [int(logits.argmax()), *next_best(engine, logits, b"", int(logits.argmax()), 2)]
    assert [g.token_ids[0] for g in gens] == firsts and len(set(firsts)) == 3
    for gen in gens:
        s = state.fork()
        ids = [gen.token_ids[0]]
        while len(ids) < 10:
            out = model.forward(torch.tensor(ids[-1:]), s)
            out[sorted(tokenizer.control.stop_ids)] = float("-inf")
            ids.append(int(out.argmax()))
        assert gen.token_ids == ids


def test_alternatives_are_fewer_where_their_state_copies_would_not_fit(tiny_loaded) -> None:
    """Each alternative decodes on a copy of the state, counted against the cache's cap: a cap with
    room for one copy besides the live state gives one alternative, no room none (forks_refused)."""
    fixture = next(f for f in load_fixtures() if f["character"] == 0)  # nothing to heal: branch at once
    cursor = Document("x", fixture["text"]).offset_at(fixture["line"], fixture["character"])
    prompt = PromptBuilder(tiny_loaded.tokenizer).build(fixture["text"], cursor)
    probe = Engine(tiny_loaded.tokenizer, StateCache(tiny_loaded.model, enabled=False))
    assert probe.prefill_request("d", prompt, lambda: False).complete
    live = probe.cache.nbytes()
    (copy,) = probe.cache.branches(1, room=10, protect="d")

    def made(cap: int) -> tuple[int, int]:
        cache = StateCache(tiny_loaded.model, enabled=False, max_bytes=cap)
        gens = generate_candidates(Engine(tiny_loaded.tokenizer, cache), "d", prompt, 10, 4, ignore_eos=True)
        return len(gens) - 1, cache.stats.forks_refused

    assert made(1 << 30) == (3, 0)
    assert made(live + copy.nbytes * 3 // 2) == (1, 2)
    assert made(0) == (0, 3)


def test_a_cancelled_request_stops_every_candidate(make_service, tiny_loaded) -> None:
    fixture = load_fixtures()[0]
    cursor = Document("x", fixture["text"]).offset_at(fixture["line"], fixture["character"])
    prompt = PromptBuilder(tiny_loaded.tokenizer).build(fixture["text"], cursor)
    engine = Engine(tiny_loaded.tokenizer, StateCache(tiny_loaded.model, enabled=False))
    polls = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) > 3  # after two decode steps

    gens = generate_candidates(engine, "d", prompt, 40, 3, ignore_eos=True, cancelled=cancelled)
    assert [g.stop_reason for g in gens] == ["cancelled"] * 3
    assert all(len(g.token_ids) == 2 for g in gens)


def test_invoked_request_answers_several_items_automatic_one(rpc: RpcClient) -> None:
    """The real server: an automatic request gets one item, an invoked one (what VS Code sends to
    cycle) that same item first and the alternatives after it; ``candidates`` sets how many."""
    rpc.initialize({"typeThrough": False})
    fixture = next(f for f in load_fixtures() if "\n" not in f["middle"])
    uri = "file:///cands.py"
    rpc.open(uri, fixture["text"])
    line, col = fixture["line"], fixture["character"]
    auto = rpc.inline(uri, line, col, automatic=True)["items"]
    invoked = rpc.inline(uri, line, col)["items"]
    assert len(auto) == 1 and auto[0]["insertText"] == fixture["middle"]
    assert invoked[0] == auto[0]
    assert 2 <= len(invoked) <= 3, invoked
    assert len({i["insertText"] for i in invoked}) == len(invoked)
    assert rpc.call("granite/stats")["counters"]["alternatives"] == len(invoked) - 1
    rpc.notify("workspace/didChangeConfiguration", {"settings": {"granite": {"candidates": 1, "typingCandidates": 2}}})
    assert len(rpc.inline(uri, line, col)["items"]) == 1
    typing = rpc.inline(uri, line, col, automatic=True)["items"]
    assert typing[0] == auto[0] and len(typing) == 2


def test_asking_again_at_the_same_place_reuses_the_alternatives(make_service) -> None:
    """Cycling asks again where the suggestion is shown: the alternatives made with it are the answer
    (no model run); typing through it gets its rest alone; a suggestion made with one candidate gets
    its alternatives from the model, itself staying first."""
    fixture = next(f for f in load_fixtures() if "\n" not in f["middle"])
    text = fixture["text"]
    cursor = Document("x", text).offset_at(fixture["line"], fixture["character"])
    svc = make_service()
    first = svc.complete("file:///a.py", text, cursor, candidates=3)
    assert first.alternatives
    again = svc.complete("file:///a.py", text, cursor, candidates=3)
    assert again.generation.stop_reason == "typed_through"
    assert (again.suggestion, again.alternatives) == (first.suggestion, first.alternatives)
    typed = text[:cursor] + first.suggestion.text[0] + text[cursor:]
    through = svc.complete("file:///a.py", typed, cursor + 1, candidates=3)
    assert through.generation.stop_reason == "typed_through" and through.alternatives == []
    assert through.suggestion.text == first.suggestion.text[1:]

    svc = make_service()
    single = svc.complete("file:///a.py", text, cursor)
    prefills = svc.cache.stats.prefills
    more = svc.complete("file:///a.py", text, cursor, candidates=3)
    assert svc.cache.stats.prefills == prefills + 1  # the model made the alternatives
    assert more.suggestion == single.suggestion and more.alternatives == first.alternatives
