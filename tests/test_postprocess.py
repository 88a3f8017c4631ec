"""Each post-processing rule, on plain text (no model needed)."""

from __future__ import annotations

from granite_lsp.postprocess import CursorContext, Shaper


def _shape(text: str, cursor_marker: str, raw: str, **kw):
    cursor = text.index(cursor_marker)
    text = text.replace(cursor_marker, "", 1)
    return Shaper(CursorContext.at(text, cursor, **kw)).finish(raw)


def _wants(text: str, marker: str, raw: str) -> bool:
    cursor = text.index(marker)
    return Shaper(CursorContext.at(text.replace(marker, "", 1), cursor)).wants_more(raw)


def test_mid_line_gets_one_line() -> None:
    s = _shape("x = foo(|, y)\n", "|", "a + 1\nmore()\n")
    assert s.text == "a + 1"
    assert not _wants("x = foo(|, y)\n", "|", "a\n")


def test_end_of_line_gets_a_block_until_dedent() -> None:
    text = "def f(x):\n    |\n\ndef g():\n    pass\n"
    s = _shape(text, "|", "y = x * 2\n    return y\ndef h():\n    pass")
    assert s.text == "y = x * 2\n    return y"


def test_block_opened_on_cursor_line_ends_when_it_closes() -> None:
    text = "if ready:|\nprint('done')\n"
    s = _shape(text, "|", "\n    go()\n    stop()\nelse:\n    wait()")
    assert s.text == "\n    go()\n    stop()"


def test_closing_bracket_of_the_block_is_kept() -> None:
    text = "function f() {|\n"
    s = _shape(text, "|", "\n  return 1;\n}\nfunction g() {}")
    assert s.text == "\n  return 1;\n}"


def test_stops_when_repeating_the_following_lines() -> None:
    text = "def f():\n    |\n    return total\n"
    s = _shape(text, "|", "total = 0\n    return total\n")
    assert s.text == "total = 0"


def test_line_cap() -> None:
    text = "def f():\n    |\n"
    raw = "\n".join(f"    x{i} = {i}" for i in range(20)).lstrip()
    s = Shaper(CursorContext.at(text.replace("|", ""), text.index("|")), max_lines=3).finish(raw)
    assert s.text.count("\n") == 2


def test_trailing_whitespace_trimmed_and_whitespace_only_dropped() -> None:
    assert _shape("x = |\n", "|", "1   \n").text == "1"
    assert _shape("def f():\n    |\n", "|", "   \n  \n") is None
    assert _shape("x = |\n", "|", "") is None


def test_auto_closed_bracket_is_merged_not_duplicated() -> None:
    s = _shape("print(|)\n", "|", "'hello')")
    assert s.text == "'hello')" and s.replace == 1  # replaces the editor's ")": one closer remains
    s = _shape("print(|)\n", "|", "'hello'")
    assert s.text == "'hello'" and s.replace == 0  # keeps the editor's ")"


def test_indentation_follows_the_buffer() -> None:
    text = "def f():\n\tif x:\n\t\t|\n"
    s = _shape(text, "|", "a = 1\n        b = 2\n\tc = 3", tab_size=4, insert_spaces=False)
    assert s.text == "a = 1\n\t\tb = 2"
    text2 = "def f():\n    if x:\n        |\n"
    s2 = _shape(text2, "|", "a = 1\n\t\tb = 2", tab_size=4, insert_spaces=True)
    assert s2.text == "a = 1\n        b = 2"


def test_statements_after_a_nested_block_stay_in_the_cursor_block() -> None:
    text = "fn push() {\n        |\n    }\n"
    raw = "if full {\n            return Err(x);\n        }\n        items.push(x);\n        Ok(())\n    }\nfn next() {"
    s = _shape(text, "|", raw)
    assert s.text == "if full {\n            return Err(x);\n        }\n        items.push(x);\n        Ok(())"


def test_a_short_unit_repeated_is_dropped_and_stops_generation() -> None:
    """The degenerate output seen in use: ``hist`` sixty times."""
    text = "import numpy as np\ncounts = |\n"
    assert _shape(text, "|", "hist" * 60) is None
    assert not _wants(text, "|", "hist" * 8)  # generation stops as soon as the loop is long enough
    assert _wants(text, "|", "hist" * 3)


def test_a_loop_after_good_lines_keeps_those_lines() -> None:
    text = "def f(x):\n    |\n"
    raw = "y = x + 1\n    z = y * 2\n    w = np.histhisthisthisthisthisthisthisthisthisthist"
    assert _shape(text, "|", raw).text == "y = x + 1\n    z = y * 2"
    repeated_lines = "y = x + 1\n" + "    a = 1\n" * 6
    assert _shape(text, "|", repeated_lines).text == "y = x + 1"


def test_rulers_and_ordinary_code_are_not_repetition() -> None:
    from granite_lsp.postprocess import repetition

    assert repetition("# " + "=" * 70) is None  # no letter or digit in the unit
    assert repetition("-" * 40 + "\n" + " " * 40) is None
    assert repetition("for i in range(10):\n    total += values[i] * weights[i]\n") is None
    assert repetition("ab" * 15) is None  # 30 characters: under the minimum
    assert repetition("x = " + "ab" * 16) == (4, 2)


def test_the_rules_run_once_per_generated_token(make_service, monkeypatch) -> None:
    """The decode loop asks ``wants_more`` and the partial answer ``preview`` about the same text after
    every token: one pass of the rules (``Shaper._cut``) serves both (it ran twice per token)."""
    from conftest import load_fixtures

    passes = []
    cut = Shaper._cut

    def counted(self: Shaper, text: str, final: bool = False) -> tuple[str, bool]:
        if not final:
            passes.append(text)
        return cut(self, text, final)

    monkeypatch.setattr(Shaper, "_cut", counted)
    fixture = next(f for f in load_fixtures() if "\n" in f["middle"])
    from granite_lsp.documents import Document

    cursor = Document("x", fixture["text"]).offset_at(fixture["line"], fixture["character"])
    shown = []
    gen = make_service().complete("file:///rules.py", fixture["text"], cursor, on_progress=shown.append).generation
    assert gen.stats.generated_tokens > 1 and len(shown) == gen.stats.generated_tokens
    assert len(passes) == gen.stats.generated_tokens, (len(passes), gen.stats.generated_tokens)
