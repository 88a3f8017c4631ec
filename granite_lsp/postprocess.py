"""Shaping raw model output into a suggestion a user wants: one pipeline, applied while decoding.

The same rules decide when to *stop generating* (so no decode step is spent on text we would cut) and
how to *finish* the text. Every rule is conservative: it only ever shortens, trims or re-indents the
suggestion and never touches what the user already typed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


def _leading_ws(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


_CLOSING_LINE = re.compile(r"\s*([)\]}]+[;,)]*|end|fi|done|esac)\s*")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_OPENER = re.compile(r"([:{(\[]|\bdo|\bthen|=>)$")

# The repetition filter (Copilot's ``isRepetitive``, on text): a small model sometimes loops on a short
# unit ("histhisthist...", "x = 1\nx = 1\n..."). A tail of the suggestion that repeats a unit of at most
# REPEAT_MAX_PERIOD characters, holding a letter or digit (so "=====" and "-----" rulers pass), at least
# REPEAT_MIN_UNITS times over at least REPEAT_MIN_CHARS characters, ends generation; the suggestion keeps
# only the whole lines before the loop began, and is dropped when it began on the first line.
REPEAT_MAX_PERIOD = 24
REPEAT_MIN_UNITS = 4
REPEAT_MIN_CHARS = 32


def _indent_width(line: str, tab_size: int) -> int:
    ws = _leading_ws(line)
    return sum(tab_size if c == "\t" else 1 for c in ws)


@dataclass(frozen=True)
class CursorContext:
    line_prefix: str  # the cursor's line up to the cursor
    line_rest: str  # the cursor's line after the cursor
    following: tuple[str, ...]  # a few lines after the cursor's line
    tab_size: int = 4
    insert_spaces: bool | None = None  # None: keep whatever the model wrote

    @classmethod
    def at(cls, text: str, cursor: int, tab_size: int = 4, insert_spaces: bool | None = None) -> CursorContext:
        start = max(text.rfind("\n", 0, cursor), text.rfind("\r", 0, cursor)) + 1
        m = _LINE_BREAK.search(text, cursor)
        end = m.start() if m else len(text)
        following: list[str] = []
        pos = m.end() if m else len(text)
        while m and len(following) < 4:
            m = _LINE_BREAK.search(text, pos)
            following.append(text[pos : m.start() if m else len(text)])
            pos = m.end() if m else len(text)
        if insert_spaces is None:
            insert_spaces = _detect_spaces(text[max(0, cursor - 4000) : cursor + 4000])
        return cls(text[start:cursor], text[cursor:end], tuple(following), tab_size, insert_spaces)

    @property
    def multiline(self) -> bool:
        """Mid-line (any text after the cursor on its line) gets one line; at a line's end, a block."""
        return not self.line_rest.strip()


def repetition(text: str) -> tuple[int, int] | None:
    """(start, period) of a degenerate loop at the end of ``text`` (see REPEAT_*), or None.

    For each period p, the tail is periodic back to the first i with text[i] != text[i + p]; typical
    text breaks within a few characters, so this costs little per decoded token. ``start`` is where the
    periodic run begins, which may be up to p - 1 characters before the loop's first whole unit.
    """
    n = len(text)
    for p in range(1, min(REPEAT_MAX_PERIOD, n // REPEAT_MIN_UNITS) + 1):
        i = n - p - 1
        while i >= 0 and text[i] == text[i + p]:
            i -= 1
        run = n - (i + 1)
        if run >= max(REPEAT_MIN_UNITS * p, REPEAT_MIN_CHARS) and any(c.isalnum() for c in text[n - p :]):
            return i + 1, p  # the shortest period: the unit itself, not a multiple of it
    return None


def _detect_spaces(sample: str) -> bool | None:
    tabs = len(re.findall(r"^\t", sample, re.M))
    spaces = len(re.findall(r"^ {2,}", sample, re.M))
    if tabs == spaces == 0:
        return None
    return spaces >= tabs


@dataclass
class Suggestion:
    text: str  # what to insert at the cursor
    replace: int  # how many characters after the cursor (on its line) the insertion replaces


@dataclass
class Shaper:
    ctx: CursorContext
    max_lines: int = 10
    _base: int | None = field(default=None, init=False)
    # The last text judged while decoding and the rules' verdict on it: after every token the decode
    # loop asks ``wants_more`` and the partial answer ``preview`` about the same text, one rule pass.
    _judged: tuple[str, tuple[str, bool]] | None = field(default=None, init=False, repr=False)

    def wants_more(self, text: str) -> bool:
        """Decode another token? False once the text has reached a point where ``finish`` would cut."""
        return self._decoding(text)[1] is False

    def preview(self, text: str) -> str:
        """What would be shown of ``text`` so far (for streaming): the part the rules keep."""
        return self._decoding(text)[0]

    def _decoding(self, text: str) -> tuple[str, bool]:
        judged = self._judged
        if judged is None or judged[0] != text:
            judged = self._judged = (text, self._cut(text))
        return judged[1]

    def finish(self, text: str) -> Suggestion | None:
        kept, _ = self._cut(text, final=True)
        lines = [ln.rstrip() for ln in _LINE_BREAK.split(kept)]
        while lines and not lines[-1].strip() and len(lines) > 1:
            lines.pop()
        lines = self._reindent(lines)
        out = "\n".join(lines)
        if len(lines) == 1:
            out = out.rstrip() if self.ctx.line_rest.strip() == "" else out
        if not out.strip():
            return None
        return Suggestion(out, self._merge_len(out))

    # ---- rules ---------------------------------------------------------------------------------------

    def _cut(self, text: str, final: bool = False) -> tuple[str, bool]:
        """The part of ``text`` to keep, and whether a rule has already ended it.

        The block the suggestion starts in is the cursor line's block; when the user's line ends by
        opening a block (``if x:``, ``{``), it is that new block, whose closing line still belongs to it.
        While decoding (``final`` False) the last line may still grow, so it is kept but not judged.
        """
        loop = repetition(text)
        if loop is not None:
            # Keep the whole lines before the loop (none when it began on the first line): a cut mid-line
            # would leave half a statement. Its first whole unit starts at most period - 1 after the run.
            first_unit = loop[0] + loop[1] - 1
            line_start = max(text.rfind("\n", 0, first_unit), text.rfind("\r", 0, first_unit))
            text = text[:line_start] if line_start > 0 else ""
            return self._cut(text, final=True)[0], True
        ctx = self.ctx
        parts = _LINE_BREAK.split(text)
        if not ctx.multiline:
            return parts[0], len(parts) > 1
        kept = [parts[0]]
        # The user's line opens a block and the suggestion starts below it: the suggestion is its body.
        opens = _OPENER.search(ctx.line_prefix.rstrip()) and not parts[0].strip()
        opener_indent = _indent_width(ctx.line_prefix, ctx.tab_size) if opens else None
        first_full = ctx.line_prefix + parts[0]
        if opener_indent is not None:
            base: int | None = opener_indent + 1  # anything at the opener's level or left of it ends it
        else:
            base = _indent_width(first_full, ctx.tab_size) if first_full.strip() else None
        # A line equal to the code right after the cursor means it is re-writing it; closers like "}" are
        # too common to tell anything.
        next_line = next((ln.strip() for ln in ctx.following if ln.strip()), None)
        if next_line is not None and _CLOSING_LINE.fullmatch(next_line):
            next_line = None
        for i, line in enumerate(parts[1:], start=1):
            if len(kept) >= self.max_lines:
                return "\n".join(kept), True
            if i == len(parts) - 1 and not final:
                kept.append(line)
                break
            if line.strip():
                if line.strip() == next_line:
                    return "\n".join(kept), True  # it started re-writing the code after the cursor
                width = _indent_width(line, ctx.tab_size)
                if base is None:
                    base = width
                elif width < base:
                    # Dedented out of its block; the lone closer of a block the user opened belongs to it.
                    if width == opener_indent and _CLOSING_LINE.fullmatch(line):
                        kept.append(line)
                    return "\n".join(kept), True
            kept.append(line)
        return "\n".join(kept), False

    def _reindent(self, lines: list[str]) -> list[str]:
        """Convert the leading whitespace of continuation lines to the buffer's style (tabs vs spaces)."""
        spaces = self.ctx.insert_spaces
        if spaces is None or len(lines) < 2:
            return lines
        out = [lines[0]]
        tab = self.ctx.tab_size
        for line in lines[1:]:
            ws = _leading_ws(line)
            width = _indent_width(line, tab)
            new_ws = " " * width if spaces else "\t" * (width // tab) + " " * (width % tab)
            out.append(new_ws + line[len(ws) :])
        return out

    def _merge_len(self, text: str) -> int:
        """Characters after the cursor that the suggestion also writes (auto-closed brackets, quotes).

        Replacing them instead of inserting before them leaves exactly one closing character.
        """
        rest = self.ctx.line_rest
        core = rest.rstrip()
        if not core:
            return 0
        first = text.split("\n", 1)[0]
        if "\n" in text:
            return 0
        if first.endswith(core):
            return len(rest)
        return 0
