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
    ring = ContextRing(roots=("/w",))
    ring.note("file:///w/a.py", 0, "def helper_a():\n    return 1\n")
    ring.note("file:///w/lib/b.py", 0, "def helper_b():\n    return 2\n")
    ids = ring.ids("file:///w/a.py", tok, budget=10_000, filename=False)
    text = tok.decode(ids)
    assert ids[0] == tok.control.filename
    assert text.startswith("lib/b.py\ndef helper_b()") and "helper_a" not in text  # relative to the workspace
    assert ring.ids("file:///w/c.py", tok, budget=0, filename=False) == []
    small = ring.ids("file:///w/c.py", tok, budget=len(ids) + 2, filename=False)
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
    assert ring.ids("file:///w/c.py", tok, 10_000, filename=False) == []


def test_context_goes_before_the_fim_prompt(tok: TextTokenizer) -> None:
    ring = ContextRing()
    ring.note("file:///w/util.py", 0, "def util():\n    pass\n")
    ctx = ring.ids("file:///w/main.py", tok, 10_000)
    p = PromptBuilder(tok).build("x = 1\n", 6, ctx)
    assert p.ids[: len(ctx)] == ctx and p.ids[len(ctx)] == tok.control.fim_prefix
    assert p.context_len == len(ctx)


def test_workspace_relative_names() -> None:
    from types import SimpleNamespace

    from granite_lsp.context import display_path, workspace_roots

    folders = [SimpleNamespace(uri="file:///home/u/proj"), SimpleNamespace(uri="file:///home/u/proj/sub%20dir")]
    roots = workspace_roots(SimpleNamespace(workspace_folders=folders, root_uri=None, root_path=None))
    assert roots == ["/home/u/proj", "/home/u/proj/sub dir"]
    assert workspace_roots(SimpleNamespace(workspace_folders=None, root_uri="file:///r/", root_path=None)) == ["/r"]
    assert display_path("file:///home/u/proj/src/app.py", roots) == "src/app.py"
    assert display_path("file:///home/u/proj/sub%20dir/x.ts", roots) == "x.ts"  # the innermost folder
    assert display_path("file:///elsewhere/notes.md", roots) == "notes.md"  # outside: the file name only
    assert display_path("file:///home/u/projects/y.py", roots) == "y.py"  # a sibling, not inside /home/u/proj
    assert display_path("untitled:Untitled-1", roots) is None
    assert display_path("file:///c:/Users/u/proj/m.py", ["c:/Users/u/proj"]) == "m.py"


def test_the_current_files_name_comes_once_right_before_the_fim_prompt(tok: TextTokenizer) -> None:
    """Repository-level form: other files' blocks, then the current file's name, then the FIM prompt."""
    ring = ContextRing(roots=("/w",))
    ring.note("file:///w/util.py", 0, "def util():\n    pass\n")
    ctx = ring.ids("file:///w/src/main.py", tok, 10_000)
    p = PromptBuilder(tok).build("import util\nx = |\n".replace("|", ""), 16, ctx)
    ctl = tok.control
    controls = [t for t in p.ids if t in (ctl.filename, ctl.fim_prefix, ctl.fim_suffix, ctl.fim_middle)]
    assert controls == [ctl.filename, ctl.filename, ctl.fim_prefix, ctl.fim_suffix, ctl.fim_middle]
    own = p.ids.index(ctl.fim_prefix)
    header = tok.decode(p.ids[p.ids.index(ctl.filename, 1) + 1 : own])
    assert header == "src/main.py\n"
    assert tok.decode(p.ids).count("src/main.py") == 1 and "util.py\ndef util()" in tok.decode(p.ids)
    # Without other files, or with context off, the name is still there; with the setting off it is not.
    assert ring.ids("file:///w/src/main.py", tok, 0) == [ctl.filename, *tok.encode("src/main.py\n")]
    assert ring.ids("file:///w/src/main.py", tok, 0, filename=False) == []
    assert ring.ids("untitled:Untitled-1", tok, 0) == []
