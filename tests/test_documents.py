"""Document sync must be exact: the server's text always equals the editor's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from granite_lsp.documents import UTF8, UTF16, UTF32, Document, PositionError


def test_line_breaks_are_lsp_ones_only() -> None:
    # U+2028, form feed and vertical tab are NOT line breaks in LSP (str.splitlines thinks they are).
    doc = Document("u", "a\u2028b\x0cc\x0bd\r\ne\rf\ng")
    assert doc.line_count() == 4
    assert doc.offset_at(1, 0) == doc.text.index("e")
    assert doc.offset_at(2, 0) == doc.text.index("f")
    assert doc.offset_at(3, 1) == len(doc.text)


def test_utf16_positions_after_astral_and_cjk() -> None:
    doc = Document("u", "x = '🎉日本' + y\n")
    # 🎉 is two UTF-16 units, one code point; 日 and 本 one unit each.
    assert doc.offset_at(0, 7, UTF16) == doc.text.index("日")
    assert doc.offset_at(0, 6, UTF32) == doc.text.index("日")
    assert doc.offset_at(0, 9, UTF8) == doc.text.index("日")
    assert doc.position_at(doc.text.index("+"), UTF16) == (0, 11)
    assert doc.position_at(doc.text.index("+"), UTF8) == (0, 17)


def test_strict_positions_refuse_what_does_not_exist() -> None:
    doc = Document("u", "ab\ncd")
    assert doc.offset_at(5, 0) == len(doc.text)  # lenient, as LSP asks for edits
    assert doc.offset_at(0, 99) == 2
    with pytest.raises(PositionError):
        doc.offset_at(5, 0, strict=True)
    with pytest.raises(PositionError):
        doc.offset_at(0, 3, strict=True)
    with pytest.raises(PositionError):
        doc.offset_at(-1, 0)


def test_edit_at_end_of_file_and_crlf_join() -> None:
    doc = Document("u", "a\r")
    doc.apply_change("\nb", (1, 0), (1, 0))
    assert doc.text == "a\r\nb"
    assert doc.line_count() == 2
    doc.apply_change("", (0, 1), (1, 0))  # delete the CRLF as one
    assert doc.text == "ab"


# ---- property test: random incremental edits against a reference model -------------------------------

# Lone surrogates (a UTF-16 editor's buffer may hold them, JSON carries them as escapes), U+2028, NUL
# and CR-only line ends: the cases that desynchronised the server's copy before.
_alphabet = st.sampled_from(
    list("ab \t") + ["\n", "\r\n", "\r", "🎉", "日", "é", "\u2028", "\x00", "\ud800", "\udc00", "\udbff"]
)
_text = st.lists(_alphabet, max_size=30).map("".join)


def _units(s: str, enc: str) -> int:
    if enc == UTF16:
        return len(s.encode("utf-16-le", "surrogatepass")) // 2
    if enc == UTF8:
        return len(s.encode("utf-8", "surrogatepass"))
    return len(s)


def _reference_lines(text: str) -> list[tuple[int, str]]:
    """(start offset, line text) for LSP lines, computed the slow obvious way."""
    out, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\r" and text[i + 1 : i + 2] == "\n":
            out.append((start, text[start:i]))
            i += 2
            start = i
        elif text[i] in "\r\n":
            out.append((start, text[start:i]))
            i += 1
            start = i
        else:
            i += 1
    out.append((start, text[start:]))
    return out


def _position(text: str, offset: int, enc: str) -> tuple[int, int]:
    lines = _reference_lines(text)
    for n, (start, line) in reversed(list(enumerate(lines))):
        if start <= offset:
            return n, _units(text[start : min(offset, start + len(line))], enc)
    raise AssertionError


@st.composite
def _edits(draw):
    text = draw(_text)
    enc = draw(st.sampled_from([UTF16, UTF8, UTF32]))
    steps = []
    for _ in range(draw(st.integers(1, 12))):
        if draw(st.integers(0, 9)) == 0:
            steps.append(("full", draw(_text)))
            continue
        # Positions are drawn on code-point boundaries (a client never splits a character).
        a = draw(st.integers(0, 40))
        b = draw(st.integers(0, 40))
        steps.append(("range", a, b, draw(_text)))
    return text, enc, steps


@settings(max_examples=2000, deadline=None)
@given(_edits())
def test_random_incremental_edits_match_reference(case) -> None:
    text, enc, steps = case
    doc = Document("u", text)
    ref = text
    for step in steps:
        if step[0] == "full":
            doc.apply_change(step[1])
            ref = step[1]
        else:
            _, a, b, new = step
            a, b = sorted((min(a, len(ref)), min(b, len(ref))))
            # An edit never splits a CRLF pair's position inside it, as no client can address that.
            if 0 < a < len(ref) and ref[a - 1 : a + 1] == "\r\n":
                a -= 1
            if 0 < b < len(ref) and ref[b - 1 : b + 1] == "\r\n":
                b += 1
            start, end = _position(ref, a, enc), _position(ref, b, enc)
            doc.apply_change(new, start, end, enc)
            ref = ref[:a] + new + ref[b:]
        assert doc.text == ref
        assert doc.line_count() == len(_reference_lines(ref))
    for offset in range(len(ref) + 1):
        if 0 < offset < len(ref) and ref[offset - 1 : offset + 1] == "\r\n":
            continue
        line, char = _position(ref, offset, enc)
        assert doc.offset_at(line, char, enc) == offset
        assert doc.position_at(offset, enc) == (line, char)


def test_lone_surrogates_keep_positions_exact() -> None:
    # A lone high surrogate is one UTF-16 unit, not the start of a pair; in UTF-8 (surrogatepass) three bytes.
    doc = Document("u", "s = '\ud800' + 1")
    plus = doc.text.index("+")
    assert doc.offset_at(0, plus, UTF16) == plus
    assert doc.position_at(plus, UTF16) == (0, plus)
    assert doc.offset_at(0, plus + 2, UTF8) == plus
    doc.apply_change("x", (0, 6), (0, 6), UTF16)  # right after the surrogate
    assert doc.text == "s = '\ud800x' + 1"
    doc.apply_change("y", (0, 8), (0, 8), UTF8)
    assert doc.text == "s = '\ud800yx' + 1"


def test_ranged_changes_update_the_line_index_incrementally() -> None:
    line = "value = compute(value) + 1  # a typical line of code\r\n"
    doc = Document("u", line * 400_000)  # 22 MB, 400,000 lines
    assert doc.line_count() == 400_001
    scanned = doc.indexed_chars
    middle = 200_000
    for i in range(100):  # one notification's worth of edits: type, join lines, split them again
        doc.apply_change("x\n" if i % 3 == 0 else "", (middle + i, 3), (middle + i + (i % 3 == 1), 0), UTF16)
        doc.apply_change("\r", (middle, 0), (middle, 0), UTF16)
    assert doc.indexed_chars - scanned < 10_000, "a ranged change re-indexed the whole document"
    incremental = doc.line_starts.tolist()
    doc._line_starts = None
    assert incremental == doc.line_starts.tolist()
