"""The FIM layout: control tokens, budgets cut at line boundaries, the sticky anchor, token healing."""

from __future__ import annotations

import pytest
from conftest import REPO, TINY

from granite_lsp.fim import FimBudget, PromptBuilder
from granite_lsp.tokens import TextTokenizer


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_dir(TINY)


def _layout(tok: TextTokenizer, ids: list[int]) -> tuple[str, str, str]:
    c = tok.control
    assert ids[0] == c.fim_prefix
    s = ids.index(c.fim_suffix)
    m = ids.index(c.fim_middle)
    return tok.decode(ids[1:s]), tok.decode(ids[s + 1 : m]), tok.decode(ids[m + 1 :])


def test_psm_layout_with_anchor_at_line_start(tok: TextTokenizer) -> None:
    text = "def f(x):\n    return x + 1\n\nprint(f(2))\n"
    cursor = text.index("x + 1")
    p = PromptBuilder(tok).build(text, cursor)
    prefix, suffix, middle = _layout(tok, p.ids)
    assert prefix == "def f(x):\n"
    assert middle.encode() + p.heal == b"    return "
    assert suffix == text[text.index("x + 1") :]  # the rest of the line is real code: the model sees it
    assert p.static_len == p.ids.index(tok.control.fim_middle) + 1


def test_closers_after_cursor_are_left_out_of_the_suffix(tok: TextTokenizer) -> None:
    text = "total = sum(\n\nnext_line()\n"
    cursor = text.index("(") + 1
    text = text[:cursor] + ")" + text[cursor:]
    p = PromptBuilder(tok).build(text, cursor)
    _, suffix, _ = _layout(tok, p.ids)
    assert p.line_rest == ")"
    assert suffix == "\n\nnext_line()\n"


def test_literal_control_strings_in_the_buffer_stay_text(tok: TextTokenizer) -> None:
    text = 'marker = "<|fim_middle|><|end_of_text|>"\nx = 1\n'
    p = PromptBuilder(tok).build(text, len(text))
    c = tok.control
    assert p.ids.count(c.fim_middle) == 1 and c.eos not in p.ids and p.ids.count(c.fim_prefix) == 1
    prefix, _, _ = _layout(tok, p.ids)
    assert prefix == text


def test_budgets_are_tokens_and_cut_at_line_starts(tok: TextTokenizer) -> None:
    lines = [f"value_{i} = compute({i}, 'x' * {i})\n" for i in range(400)]
    text = "".join(lines)
    cursor = text.index("value_300")
    budget = FimBudget(prefix_tokens=200, suffix_tokens=50)
    p = PromptBuilder(tok, budget).build(text, cursor)
    prefix, suffix, _ = _layout(tok, p.ids)
    assert len(tok.encode(prefix)) <= 200
    assert len(tok.encode(suffix)) <= 50
    assert prefix.startswith("value_") and prefix.endswith("\n")  # whole lines only
    assert suffix.endswith(")") or suffix.endswith("\n")
    assert text[p.window_start : p.anchor] == prefix
    assert p.window_start == 0 or text[p.window_start - 1] == "\n"


def test_window_and_anchor_are_sticky_while_typing(tok: TextTokenizer) -> None:
    lines = [f"item_{i} = {i}\n" for i in range(300)]
    text = "".join(lines)
    cursor = text.index("item_200")
    builder = PromptBuilder(tok, FimBudget(prefix_tokens=300, suffix_tokens=40))
    first = builder.build(text, cursor)
    typed = "result = item_1"
    prompts = []
    for k in range(1, len(typed) + 1):
        t = text[:cursor] + typed[:k] + "\n" + text[cursor:]
        prompts.append(builder.build(t, cursor + k))
    assert all(p.window_start == first.window_start and p.anchor == first.anchor for p in prompts)
    # Typing appends: once the line exists, every prompt's static part (prefix + suffix) is unchanged.
    base = prompts[0]
    assert all(p.ids[: base.static_len] == base.ids[: base.static_len] for p in prompts)
    assert all(p.ids[: len(q.ids) - 2] == q.ids[: len(q.ids) - 2] for q, p in zip(prompts, prompts[1:], strict=False))
    # Enter keeps the anchor (the new line joins the middle) ...
    t = text[:cursor] + typed + "\n    " + text[cursor:]
    after_enter = builder.build(t, cursor + len(typed) + 5)
    assert after_enter.anchor == first.anchor
    # ... and moving far above resets it.
    moved = builder.build(t, text.index("item_10 "))
    assert moved.anchor != first.anchor


def test_token_healing_withholds_the_last_piece(tok: TextTokenizer) -> None:
    text = "def f():\n    ret\n"
    cursor = text.index("ret") + 3
    p = PromptBuilder(tok).build(text, cursor)
    _, _, middle = _layout(tok, p.ids)
    assert p.heal == b" ret"
    assert middle == "   "
    # Every token the decoder may start with is consistent with the withheld bytes.
    for tid in tok.ids_consistent_with(p.heal):
        b = tok.token_bytes[tid]
        assert b.startswith(p.heal) or p.heal.startswith(b)
    assert tok.control.eos not in tok.ids_consistent_with(p.heal)


def test_an_edit_above_the_window_moves_it_with_its_text(tok: TextTokenizer) -> None:
    """An import added at the top moves the window's text without changing it: same prompt. An edit
    inside the window changes it."""
    text = "".join(f"value_{i} = compute({i}, scale={i * 3})\n" for i in range(200))
    builder = PromptBuilder(tok, FimBudget(prefix_tokens=96, suffix_tokens=32))
    cursor = text.index("value_150")
    before = builder.build(text, cursor)
    assert before.window_start > 0  # the window does not reach the top
    edited = "import functools\n" + text
    after = builder.build(edited, cursor + len("import functools\n"))
    assert after.ids == before.ids and after.window_start == before.window_start + len("import functools\n")
    inside = text[: before.window_start] + text[before.window_start :].replace("value_149", "value_X", 1)
    changed = builder.build(inside, inside.index("value_150"))
    assert changed.ids != before.ids


@pytest.mark.parametrize("trace", ["type_short", "edit_imports"])
def test_remembered_encodings_give_the_prompts_of_fresh_ones(tok: TextTokenizer, trace: str) -> None:
    """The builder keeps the ids of recent prefix windows and suffix chunks by their text: along a real
    typing (and an edit far above) trace, each prompt equals the one built with nothing remembered."""
    from granite_lsp.bench.trace import load_trace
    from granite_lsp.documents import Document

    remembering, forgetting = PromptBuilder(tok, FimBudget()), PromptBuilder(tok, FimBudget())
    docs: dict[str, Document] = {}
    built = 0
    for op in load_trace(REPO / "bench" / "traces" / f"{trace}.jsonl"):
        if op["op"] == "open":
            docs[op["uri"]] = Document(op["uri"], op["text"])
        elif op["op"] == "change":
            r = op["range"]
            start, end = (r["start"]["line"], r["start"]["character"]), (r["end"]["line"], r["end"]["character"])
            docs[op["uri"]].apply_change(op["text"], start, end)
        elif op["op"] == "complete":
            doc = docs[op["uri"]]
            cursor = doc.offset_at(op["line"], op["character"])
            forgetting._encoded.clear()
            assert remembering.build(doc.text, cursor) == forgetting.build(doc.text, cursor)
            built += 1
    assert built > 30 and len(remembering._encoded) > 1
