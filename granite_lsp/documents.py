"""The server's copy of each open document, kept exactly in sync with the editor.

pygls' own workspace splits lines with ``str.splitlines`` (which also breaks on U+2028, form feed and
friends, unlike LSP) and re-splits the whole file on every change; a completion server that re-reads a
20 MB buffer per keystroke, or disagrees with the editor about where line 40 is, inserts text in the
wrong place. LSP knows exactly three line breaks: ``\\n``, ``\\r\\n`` and ``\\r``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE_BREAK = re.compile(r"\r\n|\r|\n")

UTF8 = "utf-8"
UTF16 = "utf-16"
UTF32 = "utf-32"


class PositionError(ValueError):
    """A position that does not exist in the document (only raised where clamping would be wrong)."""


def _units_to_index(line: str, units: int, encoding: str) -> int:
    """Code-point index inside ``line`` for a column counted in the client's units (clamped to the line)."""
    if units <= 0:
        return 0
    if encoding == UTF32 or line.isascii():
        return min(units, len(line))
    if encoding == UTF16:
        raw = line.encode("utf-16-le", "surrogatepass")
        cut = raw[: 2 * units]
        # A column inside a surrogate pair points at the pair's start (LSP leaves this undefined).
        if len(cut) >= 2 and 0xD8 <= cut[-1] <= 0xDB:
            cut = cut[:-2]
        return len(cut.decode("utf-16-le", "surrogatepass"))
    raw = line.encode("utf-8", "surrogatepass")[:units]
    return len(raw.decode("utf-8", "ignore"))


def _index_to_units(line: str, index: int, encoding: str) -> int:
    prefix = line[:index]
    if encoding == UTF32 or prefix.isascii():
        return len(prefix)
    if encoding == UTF16:
        return len(prefix.encode("utf-16-le", "surrogatepass")) // 2
    return len(prefix.encode("utf-8", "surrogatepass"))


@dataclass
class Document:
    """One open text document: its full text plus a lazily rebuilt index of line starts."""

    uri: str
    text: str
    version: int | None = None
    language_id: str = ""
    _line_starts: list[int] | None = field(default=None, repr=False)

    @property
    def line_starts(self) -> list[int]:
        if self._line_starts is None:
            self._line_starts = [0] + [m.end() for m in _LINE_BREAK.finditer(self.text)]
        return self._line_starts

    def line_count(self) -> int:
        return len(self.line_starts)

    def line_span(self, line: int) -> tuple[int, int]:
        """Start and end offsets of ``line``, the end excluding its line break."""
        starts = self.line_starts
        start = starts[line]
        end = starts[line + 1] if line + 1 < len(starts) else len(self.text)
        while end > start and self.text[end - 1] in "\r\n":
            end -= 1
        return start, end

    def offset_at(self, line: int, character: int, encoding: str = UTF16, *, strict: bool = False) -> int:
        """Code-point offset of an LSP position.

        Lenient by default, as LSP asks for edits (a column past the end of a line means the line's end,
        a line past the end means the end of the document); ``strict`` refuses such positions instead,
        which is what a completion request wants: completing at a position that does not exist would
        put text where the user is not.
        """
        if line < 0 or character < 0:
            raise PositionError(f"negative position {line}:{character}")
        if line >= self.line_count():
            if strict:
                raise PositionError(f"line {line} is past the end of the document ({self.line_count()} lines)")
            return len(self.text)
        start, end = self.line_span(line)
        text = self.text[start:end]
        index = _units_to_index(text, character, encoding)
        if strict and _index_to_units(text, len(text), encoding) < character:
            raise PositionError(f"character {character} is past the end of line {line}")
        return start + index

    def position_at(self, offset: int, encoding: str = UTF16) -> tuple[int, int]:
        """LSP (line, character) of a code-point offset."""
        offset = max(0, min(offset, len(self.text)))
        starts = self.line_starts
        lo, hi = 0, len(starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        start, end = self.line_span(lo)
        return lo, _index_to_units(self.text[start:end], min(offset, end) - start, encoding)

    def apply_change(
        self,
        text: str,
        start: tuple[int, int] | None = None,
        end: tuple[int, int] | None = None,
        encoding: str = UTF16,
    ) -> None:
        """Apply one content change: a range replacement, or the whole text when ``start`` is None."""
        if start is None or end is None:
            self.text = text
        else:
            a = self.offset_at(*start, encoding)
            b = self.offset_at(*end, encoding)
            if b < a:
                a, b = b, a
            self.text = self.text[:a] + text + self.text[b:]
        self._line_starts = None


class DocumentStore:
    """All documents the client has opened, keyed by URI."""

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}

    def open(self, uri: str, text: str, version: int | None = None, language_id: str = "") -> Document:
        doc = Document(uri=uri, text=text, version=version, language_id=language_id)
        self._docs[uri] = doc
        return doc

    def get(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def __len__(self) -> int:
        return len(self._docs)

    def __iter__(self):
        return iter(list(self._docs.values()))
