"""Context from other open documents: bounded, deduplicated, stable in order, never the current file."""

from __future__ import annotations

import pytest
from conftest import TINY

from granite_lsp.context import ContextRing
from granite_lsp.fim import PromptBuilder
from granite_lsp.tokens import TextTokenizer


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_dir(TINY)


def test_blocks_are_filename_tagged_bounded_and_exclude_the_current_file(tok: TextTokenizer) -> None:
    ring = ContextRing()
    ring.note("file:///w/a.py", 0, "def helper_a():\n    return 1\n")
    ring.note("file:///w/b.py", 0, "def helper_b():\n    return 2\n")
    ids = ring.ids("file:///w/a.py", tok, budget=10_000)
    text = tok.decode(ids)
    assert ids[0] == tok.control.filename
    assert "w/b.py\ndef helper_b()" in text and "helper_a" not in text
    assert ring.ids("file:///w/c.py", tok, budget=0) == []
    small = ring.ids("file:///w/c.py", tok, budget=len(ids) + 2)
    assert len(small) <= len(ids) + 2


def test_order_is_stable_while_typing_elsewhere(tok: TextTokenizer) -> None:
    ring = ContextRing()
    ring.note("file:///w/a.py", 0, "alpha = 1\n")
    ring.note("file:///w/b.py", 0, "beta = 2\n")
    first = ring.ids("file:///w/c.py", tok, 10_000)
    ring.note("file:///w/a.py", 0, "alpha = 1\n")  # touched again: same text, same place
    for k in range(5):  # typing in the current file changes nothing
        ring.note("file:///w/c.py", 0, "gamma = " + "3" * k)
        assert ring.ids("file:///w/c.py", tok, 10_000) == first


def test_duplicates_and_closed_documents_are_dropped(tok: TextTokenizer) -> None:
    ring = ContextRing()
    ring.note("file:///w/a.py", 0, "same = True\n")
    ring.note("file:///w/copy.py", 0, "same = True\n")
    assert tok.decode(ring.ids("file:///w/c.py", tok, 10_000)).count("same = True") == 1
    ring.forget("file:///w/a.py")
    ring.forget("file:///w/copy.py")
    assert ring.ids("file:///w/c.py", tok, 10_000) == []


def test_context_goes_before_the_fim_prompt(tok: TextTokenizer) -> None:
    ring = ContextRing()
    ring.note("file:///w/util.py", 0, "def util():\n    pass\n")
    ctx = ring.ids("file:///w/main.py", tok, 10_000)
    p = PromptBuilder(tok).build("x = 1\n", 6, ctx)
    assert p.ids[: len(ctx)] == ctx and p.ids[len(ctx)] == tok.control.fim_prefix
    assert p.context_len == len(ctx)
