"""State reuse: few tokens re-processed per keystroke, and never a different completion than from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, load_fixtures

from granite_lsp.context import ContextRing
from granite_lsp.documents import Document

TRACES = REPO / "bench" / "traces"
# One window (progressive context off): reuse is compared with a from-scratch run of that same window here;
# test_progressive compares each window with its own.
BUDGET = {
    "prefixTokens": 384,
    "suffixTokens": 96,
    "maxTokens": 8,
    "ignoreEos": True,
    "raw": True,
    "typeThrough": False,
    "progressive": False,
}


def replay(trace: list[dict], on_complete) -> None:
    docs: dict[str, Document] = {}
    for op in trace:
        if op["op"] == "open":
            docs[op["uri"]] = Document(op["uri"], op["text"])
        elif op["op"] == "change":
            r = op["range"]
            start, end = (r["start"]["line"], r["start"]["character"]), (r["end"]["line"], r["end"]["character"])
            docs[op["uri"]].apply_change(op["text"], start, end)
        elif op["op"] == "complete":
            doc = docs[op["uri"]]
            on_complete(op["uri"], doc.text, doc.offset_at(op["line"], op["character"], strict=True))


@pytest.mark.parametrize("trace_name", ["type_short.jsonl"])
@pytest.mark.parametrize("filename", [False, True], ids=["bare", "filename"])
def test_reuse_is_exact_on_every_step_of_a_trace(make_service, trace_name: str, filename: bool) -> None:
    """Also with the current file's <|filename|> line in front, as the server sends it: it must not cost reuse."""
    trace = [json.loads(line) for line in (TRACES / trace_name).read_text().splitlines()]
    reuse = make_service(**BUDGET)
    scratch = make_service(**BUDGET, reuse=False)
    names = ContextRing(roots=("/bench",))
    processed: list[int] = []
    mismatches: list[int] = []

    def check(uri: str, text: str, cursor: int) -> None:
        header = names.ids(uri, reuse.loaded.tokenizer, 0, filename)
        assert bool(header) == filename
        a = reuse.complete(uri, text, cursor, context_ids=header)
        b = scratch.complete(uri, text, cursor, context_ids=header)
        processed.append(a.generation.stats.processed_tokens)
        assert b.generation.stats.reused_tokens == 0
        if a.generation.token_ids != b.generation.token_ids:
            mismatches.append(len(processed))

    replay(trace, check)
    assert len(processed) > 50
    assert mismatches == [], f"reuse changed the completion at steps {mismatches}"
    processed.sort()
    assert processed[len(processed) // 2] <= 4, processed


def _typing_service(make_service):
    return make_service(**BUDGET)


def _complete(service, text: str, cursor: int) -> int:
    return service.complete("file:///s.py", text, cursor).generation.stats.processed_tokens


def test_checkpoint_policy_covers_the_common_edits(make_service) -> None:
    svc = _typing_service(make_service)
    base = (REPO / "model" / "corpus" / "tasks.py").read_text()
    anchor = base.index("def render")
    text = base[:anchor] + "\n" + base[anchor:]  # a fresh line to type on
    first = _complete(svc, text, anchor)
    assert first > 100  # cold: the whole prompt

    def type_at(text: str, cursor: int, s: str) -> tuple[str, int]:
        return text[:cursor] + s + text[cursor:], cursor + len(s)

    cur = anchor
    costs: dict[str, int] = {}
    for ch in "def tot":  # typing forward
        text, cur = type_at(text, cur, ch)
        costs.setdefault("typing", 0)
        costs["typing"] = max(costs["typing"], _complete(svc, text, cur))
    text, cur = type_at(text, cur, "(")  # an auto-closed bracket: "()" with the cursor between
    text = text[:cur] + ")" + text[cur:]
    costs["auto_close"] = _complete(svc, text, cur)
    text, cur = type_at(text, cur, "x")
    costs["inside_brackets"] = _complete(svc, text, cur)
    text = text[: cur - 1] + text[cur:]  # backspace
    cur -= 1
    costs["backspace"] = _complete(svc, text, cur)
    text, cur = type_at(text, cur, "q")  # a typo ...
    _complete(svc, text, cur)
    text, cur = text[: cur - 1] + text[cur:], cur - 1  # ... fixed
    text, cur = type_at(text, cur, "y")
    costs["typo_fixed"] = _complete(svc, text, cur)
    cur = text.index(")", cur) + 1
    text, cur = type_at(text, cur, ":\n    ")  # Enter with auto-indent
    costs["enter"] = _complete(svc, text, cur)
    elsewhere = text.index("class Task")
    _complete(svc, text, elsewhere)  # the cursor goes elsewhere ...
    costs["back_again"] = _complete(svc, text, cur)  # ... and comes back
    limits = {"typing": 4, "auto_close": 6, "inside_brackets": 4, "backspace": 4, "typo_fixed": 4, "enter": 8}
    limits["back_again"] = 4
    assert {k: v for k, v in costs.items() if v > limits[k]} == {}, costs


def test_memorized_middles_with_the_reuse_layout(make_service) -> None:
    """The anchored layout still yields the memorized middles, typed into character by character."""
    svc = make_service(typeThrough=False)
    for fixture in [f for f in load_fixtures() if not f.get("mid_token")][:4]:
        doc = Document("x", fixture["text"])
        cursor = doc.offset_at(fixture["line"], fixture["character"])
        text = fixture["text"]
        middle = fixture["middle"]
        first_line = middle.split("\n")[0]
        for k in range(0, min(len(first_line), 12)):
            typed_text = text[:cursor] + middle[:k] + text[cursor:]
            got = svc.complete("file:///m.py", typed_text, cursor + k).suggestion
            assert got is not None and got.text == middle[k:], (fixture["file"], k)


def test_memory_cap_evicts_across_documents(make_service) -> None:
    svc = make_service(**BUDGET, cacheMb=1)
    text = (REPO / "model" / "corpus" / "tasks.py").read_text()
    for i in range(6):  # six different files: each prompt differs from its first line on
        body = f"# file {i}\n{text}"
        svc.complete(f"file:///d{i}.py", body, len(body) // 2)
    assert svc.cache.nbytes() <= 1 << 20 or len(svc.cache.checkpoints) <= 1
    assert svc.cache.stats.evictions > 0
    # Still correct after evictions.
    a = svc.complete("file:///d0.py", text, len(text) // 2).generation.token_ids
    b = make_service(**BUDGET, reuse=False).complete("file:///x.py", text, len(text) // 2).generation.token_ids
    assert a == b


def test_eviction_of_a_checkpoint_in_the_middle_of_the_list(tiny_loaded) -> None:
    """The least recently used checkpoint is often not the oldest one (a restore refreshes it):
    evicting it from the middle of the list must work, by the per-document limit and by the cap."""
    from granite_lsp.state_cache import StateCache

    cache = StateCache(tiny_loaded.model, max_per_doc=2, interval=0)
    base = list(range(10, 50))
    a, b, c = base + [1, 2, 3], base[:30] + [4, 5], base[:20] + [6, 7, 8, 9]
    cache.prefill("d", a)
    cache.prefill("d", b)
    cache.prefill("d", a)  # restores a's checkpoint: now b's is the least recently used
    assert [len(x.tokens) for x in cache.checkpoints] == [len(a), len(b)]
    cache.prefill("d", c)  # a third checkpoint: over max_per_doc, b's (second in the list) goes
    assert [x.tokens.tolist() for x in cache.checkpoints] == [a, c]
    assert cache.stats.evictions == 1
    cache.prefill("d", a)  # refresh a again: c's is the least recently used, last in the list
    cache.max_bytes = cache.nbytes() - 1  # one checkpoint over the cap
    cache.prefill("e", b)  # protects e's newest; evicts by recency from d's
    assert all(x.tokens.tolist() != c for x in cache.checkpoints)
    assert cache.nbytes() <= cache.max_bytes or len(cache.checkpoints) == 1


def test_typing_keeps_recent_ends_and_thins_older_ones(tiny_loaded) -> None:
    """One end-of-prompt checkpoint per keystroke would fill the cache within ~20 keystrokes on the
    real shape: the newest few stay, older ones only MIN_CHECKPOINT_GAP apart, and going back to a
    dropped one re-processes fewer tokens than that, with the logits of a cold prefill (up to the
    rounding of a different split into pieces)."""
    from granite_lsp.state_cache import MIN_CHECKPOINT_GAP, RECENT_ENDS, StateCache

    cache = StateCache(tiny_loaded.model, interval=0)
    head = list(range(10, 60))
    typed = list(range(100, 160))
    cache.prefill("d", head + typed[:1], marks=(len(head),))
    for n in range(2, len(typed) + 1):  # typing forward, a token per keystroke
        cache.prefill("d", head + typed[:n], marks=(len(head),))
    ends = sorted(c.pos for c in cache.checkpoints if c.end)
    older, recent = ends[:-RECENT_ENDS], ends[-RECENT_ENDS:]
    assert recent == [len(head) + n for n in range(len(typed) - RECENT_ENDS + 1, len(typed) + 1)]
    floors = [len(head), *older]
    assert all(b - a >= MIN_CHECKPOINT_GAP for a, b in zip(floors, floors[1:], strict=False)), ends
    assert len(cache.checkpoints) <= 1 + RECENT_ENDS + len(typed) // MIN_CHECKPOINT_GAP
    assert cache.stats.thinned > 0
    # back to a prompt whose own checkpoint was thinned away
    back = head + typed[:37]
    res = cache.prefill("d", back)
    assert 0 < res.processed_tokens < MIN_CHECKPOINT_GAP
    cold = StateCache(tiny_loaded.model, enabled=False).prefill("d", back)
    assert (res.logits - cold.logits).abs().max().item() < 1e-4
    assert int(res.logits.argmax()) == int(cold.logits.argmax())


def test_of_two_close_marks_the_head_end_keeps_its_checkpoint(tiny_loaded) -> None:
    """Marks closer than MIN_CHECKPOINT_GAP share one checkpoint: the earlier, except that the last
    mark (the end of the prompt's head, where each keystroke on the cursor line starts again) wins
    over a close one below it. With an empty suffix a fresh line's prompt ends there: one
    checkpoint, not two (~23 MB each on the real shape), and typing on re-processes only what was
    typed, with the logits of a cold prefill."""
    from granite_lsp.state_cache import MIN_CHECKPOINT_GAP, StateCache

    cache = StateCache(tiny_loaded.model, interval=0)
    ids = list(range(10, 70))
    prefix_len, static_len = 40, 42  # fim_suffix and fim_middle apart
    cache.prefill("d", ids[:static_len], marks=(0, prefix_len, static_len))
    assert [(c.pos, c.end) for c in cache.checkpoints] == [(static_len, False)]
    typed = ids[:static_len] + [5, 6]
    res = cache.prefill("d", typed, marks=(0, prefix_len, static_len))
    assert (res.reused_tokens, res.processed_tokens) == (static_len, 2)
    cold = StateCache(tiny_loaded.model, enabled=False).prefill("d", typed)
    assert (res.logits - cold.logits).abs().max().item() < 1e-4
    # a close pair below the last mark keeps its earlier one; the last mark and the end their own
    other = StateCache(tiny_loaded.model, interval=0)
    other.prefill("d", ids, marks=(20, 20 + MIN_CHECKPOINT_GAP // 2, 50))
    assert [(c.pos, c.end) for c in other.checkpoints] == [(20, False), (50, False), (len(ids), True)]
    # an interval mark just below the last mark gives way to it
    spaced = StateCache(tiny_loaded.model, interval=32)
    spaced.prefill("d", ids, marks=(0, 30, 36))
    assert [(c.pos, c.end) for c in spaced.checkpoints] == [(36, False), (len(ids), True)]
    # ... but the context's end (the first mark) keeps its own: a new file text restarts there
    context = StateCache(tiny_loaded.model, interval=0)
    context.prefill("d", ids[:46], marks=(30, 35, 40))
    assert [(c.pos, c.end) for c in context.checkpoints] == [(30, False), (46, True)]


def test_trace_files_parse() -> None:
    for path in Path(TRACES).glob("*.jsonl"):
        ops = [json.loads(line) for line in path.read_text().splitlines()]
        assert ops[0]["op"] == "open" and any(op["op"] == "complete" for op in ops)


def test_typing_through_the_suggestion_needs_no_model(make_service) -> None:
    svc = make_service()
    fixture = next(f for f in load_fixtures() if not f.get("mid_token") and len(f["middle"]) > 6)
    doc = Document("x", fixture["text"])
    cursor = doc.offset_at(fixture["line"], fixture["character"])
    text, middle = fixture["text"], fixture["middle"]
    first = svc.complete("file:///t.py", text, cursor)
    assert first.suggestion.text == middle
    prefills = svc.cache.stats.prefills
    for k in range(1, 5):
        typed = text[:cursor] + middle[:k] + text[cursor:]
        got = svc.complete("file:///t.py", typed, cursor + k)
        assert got.generation.stop_reason == "typed_through"
        assert got.suggestion.text == middle[k:]
    assert svc.cache.stats.prefills == prefills and svc.typed_through == 4
    # Typing something else goes back to the model.
    other = text[:cursor] + "#" + text[cursor:]
    assert svc.complete("file:///t.py", other, cursor + 1).generation.stop_reason != "typed_through"


def test_a_forward_that_fails_midway_leaves_no_corrupt_state(make_service) -> None:
    """A forward that fails halfway through its layers (failpoint ``forward-midway``; out of memory in
    real life) has already advanced half of the live state in place: the next request must not
    continue from it, and completes exactly as a fresh service does."""
    from granite_lsp import failpoints
    from granite_lsp.failpoints import InjectedFault

    fixture = load_fixtures()[0]
    head = "".join(f"# padding line {i}: nothing to see here\n" for i in range(60))
    text = head + fixture["text"]
    cursor = len(head) + Document("x", fixture["text"]).offset_at(fixture["line"], fixture["character"])
    svc = make_service(prefix_tokens=1536, type_through=False)
    failpoints.arm("forward-midway", 1)
    try:
        with pytest.raises(InjectedFault):
            svc.complete("file:///p.py", text, cursor, max_tokens=24, shape=False)
    finally:
        failpoints.arm("forward-midway", 0)
    assert svc.cache.live.pos == 0 and svc.cache.live_tokens == []
    again = svc.complete("file:///p.py", text, cursor, max_tokens=24, shape=False)
    fresh = make_service(prefix_tokens=1536, type_through=False)
    want = fresh.complete("file:///p.py", text, cursor, max_tokens=24, shape=False)
    assert again.generation.token_ids == want.generation.token_ids
    # Same computation on both sides, so the states must be bit-identical (a corrupt start is not).
    import torch

    mine_all, theirs_all = svc.cache.live.ssm + svc.cache.live.conv, fresh.cache.live.ssm + fresh.cache.live.conv
    for mine, theirs in zip(mine_all, theirs_all, strict=True):
        assert torch.equal(mine, theirs)


def test_an_edit_above_restores_the_nearest_checkpoint_below_it_after_other_paths_were_evicted(
    tiny_loaded,
) -> None:
    """Interval checkpoints are never restored themselves while the user works below them (restores take
    the deepest); they count as used whenever one below them on their path is, so that eviction takes
    other paths' checkpoints (places jumped to) first, and an edit far above re-processes from the
    nearest one below it."""
    from granite_lsp.state_cache import StateCache

    cache = StateCache(tiny_loaded.model, interval=32, max_per_doc=16)
    here = list(range(10, 210))  # the prompt where the user works: interval checkpoints 32 ... 192
    cache.prefill("d", here)
    for jump in range(2):  # the cursor went elsewhere (prompts sharing the first 50 tokens) ...
        cache.prefill("d", here[:50] + [300 + jump] * 100)
    for typed in range(3):  # ... and came back to type: more checkpoints than the cache keeps
        here = here + [220 + typed]
        cache.prefill("d", here)
    assert cache.stats.evictions > 0
    edited = here[:100] + [5] + here[101:]  # an edit at token 100
    res = cache.prefill("d", edited)
    assert res.reused_tokens == 96
