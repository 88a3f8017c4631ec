"""The FIM prompt layout: what the model sees for a cursor, arranged so that typing appends to it.

Granite was trained prefix-suffix-middle (PSM):

    <|fim_prefix|>{before}<|fim_suffix|>{after}<|fim_middle|>{middle}

A Mamba state cannot be rolled back, so any change early in the prompt forces re-processing everything
after it. The plain layout puts the cursor at the end of the *prefix*, in front of the whole suffix, so
every keystroke would re-process the suffix. We instead cut the prefix at an **anchor** (a line start at
or before the cursor) and put the text from the anchor to the cursor after ``<|fim_middle|>``, as the
beginning of the middle; typing then appends to the prompt. For the model this is the same task: it saw
middles that begin at line starts and continues one it has been given the start of.

Stickiness, so that the prompt's early part rarely changes:
- the anchor stays put while the user types forward, presses Enter, or fixes a typo below it, until the
  text before it changes, the cursor moves above it, or the middle grows past ``max_anchor_lines``;
- the start of the prefix window stays put until the window outgrows its token budget, and is then
  moved to leave slack (``window_slack``) so that it does not move again on the next line;
- an edit above the window moves its text without changing it: the placement follows the text (the
  prompt stays the same, and so do its state checkpoints);
- text after the cursor on the cursor's line is left out of the suffix when it is only closing
  brackets/quotes/punctuation (what an editor auto-inserts as you type ``(``): the suffix then does not
  change on every bracket, and post-processing merges the completion with those characters.

Token healing: BPE merges make the last word typed tokenize differently from the same word inside the
middle the model would write ("ret" vs "return"). The last pre-tokenizer piece of the typed middle is
withheld from the prompt and handed to the decoder as bytes that its first tokens must reproduce.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .tokens import TextTokenizer

# What editors auto-insert after the cursor; such a remainder is merged, not shown to the model.
_CLOSERS_ONLY = re.compile(r"[\s)\]}>\"'`;:,.]*")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
MAX_HEAL_BYTES = 48
MEMORIES = 4  # placements remembered per document
MAX_LINE_MIDDLE = 1024  # characters of the cursor's line that may go after <|fim_middle|>


@dataclass(frozen=True)
class FimBudget:
    prefix_tokens: int = 1536
    suffix_tokens: int = 256
    max_anchor_lines: int = 8
    window_slack: float = 0.25


@dataclass
class FimPrompt:
    ids: list[int]
    heal: bytes  # typed bytes withheld from ``ids``; the completion must start with them
    cursor: int  # code-point offset of the cursor in the document
    anchor: int  # where the middle begins (a line start <= cursor)
    window_start: int  # first character of the prefix window
    line_rest: str  # text after the cursor on its line that the prompt left out (merged afterwards)
    static_len: int  # ids up to and including <|fim_middle|>: changes only when prefix or suffix do
    prefix_len: int  # ids up to the end of the prefix window: survives edits after the cursor
    context_len: int = 0  # ids of extra context in front of <|fim_prefix|>


def _line_start(text: str, offset: int) -> int:
    return max(text.rfind("\n", 0, offset), text.rfind("\r", 0, offset)) + 1


def _line_end(text: str, offset: int) -> int:
    m = _LINE_BREAK.search(text, offset)
    return m.start() if m else len(text)


def _is_line_start(text: str, offset: int) -> bool:
    return offset == 0 or (0 < offset <= len(text) and text[offset - 1] in "\r\n")


@dataclass
class _Memory:
    """What the previous prompt of a document was anchored to."""

    window_start: int = -1
    anchor: int = -1
    head: str = ""  # text[window_start:anchor] when it was chosen
    cursor: int = -1  # where the last prompt placed by it had its cursor


def _moved(text: str, mem: _Memory, cursor: int) -> int:
    """How far the text a placement was made for has moved (0: in place), or a shift that no placement
    passes (-len(text) - 1) when it is gone.

    An edit above the window (an import added at the top, a paste higher up) moves the window's text
    without changing it: the placement follows it (its nearest occurrence before the cursor), so the
    prompt, and every checkpoint of it, stays the same."""
    if 0 <= mem.window_start and text[mem.window_start : mem.anchor] == mem.head:
        return 0
    gone = -len(text) - 1
    if not mem.head:
        return gone
    at = text.rfind(mem.head, 0, cursor)
    return at - mem.window_start if at >= 0 else gone


@dataclass
class PromptBuilder:
    """Builds prompts for one document, remembering the anchor and window between requests."""

    tokenizer: TextTokenizer
    budget: FimBudget = field(default_factory=FimBudget)
    _memories: list[_Memory] = field(default_factory=list)  # most recent first
    # The ids of recent prefix windows and suffix chunks, by their exact text: typing keeps both texts
    # as they are (the anchor stays, the text after the cursor's line is the same), and re-encoding them
    # was most of a keystroke's prompt building (bench phase "prompt"), all of it before the first text.
    _encoded: list[tuple[tuple[str, str, bool], list[int]]] = field(default_factory=list)

    def build(
        self, text: str, cursor: int, context_ids: list[int] | None = None, *, remember: bool = True
    ) -> FimPrompt:
        """``remember=False``: the prompt a request at ``cursor`` would get now, leaving the memory of
        placements as it is (work ahead of a request must not change the layout of the requests)."""
        tok = self.tokenizer
        ctl = tok.control
        anchor, window_start = self._place(text, cursor, remember)
        prefix_ids = self._window_ids(text[window_start:anchor])

        line_end = _line_end(text, cursor)
        rest = text[cursor:line_end]
        line_rest = rest if _CLOSERS_ONLY.fullmatch(rest) else ""
        suffix_ids = self._suffix_ids(text, line_end if line_rest else cursor)

        middle_ids, heal = self._middle(text[anchor:cursor])
        context = list(context_ids or [])
        head = [*context, ctl.fim_prefix, *prefix_ids, ctl.fim_suffix, *suffix_ids, ctl.fim_middle]
        return FimPrompt(
            ids=head + middle_ids,
            heal=heal,
            cursor=cursor,
            anchor=anchor,
            window_start=window_start,
            line_rest=line_rest,
            static_len=len(head),
            prefix_len=len(context) + 1 + len(prefix_ids),
            context_len=len(context),
        )

    def _place(self, text: str, cursor: int, remember: bool = True) -> tuple[int, int]:
        """Choose (anchor, window_start), keeping a recent placement when it is still valid.

        Several are remembered so that moving the cursor elsewhere and back finds the old one (and
        with it the state checkpoints of the old prompt).
        """
        b = self.budget
        # A return to where a placement was last used (a jump there and straight back) takes that one,
        # not the newer placement made elsewhere: the prompt is then the one the user left, and its
        # checkpoints cost nothing to restore. Otherwise the most recent valid one (typing forward).
        order = sorted(range(len(self._memories)), key=lambda i: self._memories[i].cursor != cursor)
        for i in order:
            mem = self._memories[i]
            shift = _moved(text, mem, cursor)
            window_start, anchor = mem.window_start + shift, mem.anchor + shift
            if (
                0 <= window_start <= anchor <= cursor
                and (_is_line_start(text, anchor) or cursor - anchor <= MAX_LINE_MIDDLE)
                and _is_line_start(text, window_start)
                and len(_LINE_BREAK.findall(text, anchor, cursor)) <= b.max_anchor_lines
            ):
                if remember:
                    mem.window_start, mem.anchor, mem.cursor = window_start, anchor, cursor
                    self._memories.insert(0, self._memories.pop(i))
                return anchor, window_start
        anchor = _line_start(text, cursor)
        if cursor - anchor > MAX_LINE_MIDDLE:
            # A huge line (minified code, data): the middle would be the whole line. Start it a little
            # before the cursor instead; the model just sees a prefix that ends mid-line.
            anchor = cursor - MAX_LINE_MIDDLE // 4
        window_start = self._memories[0].window_start if self._memories else -1
        if not (0 <= window_start <= anchor and _is_line_start(text, window_start)) or (
            len(self._window_ids(text[window_start:anchor])) > b.prefix_tokens
        ):
            window_start = self._window_start(text, anchor)
        if remember:
            self._memories.insert(0, _Memory(window_start, anchor, text[window_start:anchor], cursor))
            del self._memories[MEMORIES:]
        return anchor, window_start

    def _window_start(self, text: str, anchor: int) -> int:
        """The earliest line start whose window fits the budget, less the slack when it must be cut."""
        budget = self.budget.prefix_tokens
        # Look back far enough for the budget (tokens are rarely shorter than 1 character on average).
        lo = max(0, anchor - budget * 12)
        ids, offsets = self.tokenizer.encode_with_offsets(text[lo:anchor])
        if len(ids) <= budget and lo == 0:
            return 0
        keep = int(budget * (1.0 - self.budget.window_slack))
        first = max(0, len(ids) - keep)
        start = lo + (offsets[first][0] if first < len(offsets) else anchor - lo)
        if _is_line_start(text, start):
            return start
        # Cut at the next line start so the window never begins mid-line (unless the line is huge).
        m = _LINE_BREAK.search(text, start, anchor)
        return m.end() if m else start

    def _suffix_ids(self, text: str, start: int) -> list[int]:
        budget = self.budget.suffix_tokens
        chunk = text[start : start + budget * 12]
        at_end = start + len(chunk) >= len(text)
        return self._remembered(("suffix", chunk, at_end), lambda: self._cut_suffix(chunk, at_end))

    def _cut_suffix(self, chunk: str, at_end: bool) -> list[int]:
        budget = self.budget.suffix_tokens
        ids, offsets = self.tokenizer.encode_with_offsets(chunk)
        if len(ids) <= budget and at_end:
            return ids
        limit = offsets[budget][0] if len(ids) > budget else len(chunk)
        # End at the last line end within the budget; a suffix that stops mid-line reads as truncated code.
        cut = max(chunk.rfind("\n", 0, limit), chunk.rfind("\r", 0, limit))
        return self.tokenizer.encode(chunk[: cut if cut > 0 else limit])

    def _window_ids(self, window: str) -> list[int]:
        return self._remembered(("prefix", window, False), lambda: self.tokenizer.encode(window))

    def _remembered(self, key: tuple[str, str, bool], compute: Callable[[], list[int]]) -> list[int]:
        """``compute()``, remembered for the last few keys: exact, as the ids are a function of the key's
        text alone (the tokenizer and budget are the builder's). The list is shared: callers copy it."""
        for i, (known, ids) in enumerate(self._encoded):
            if known == key:
                if i:
                    self._encoded.insert(0, self._encoded.pop(i))
                return ids
        ids = compute()
        self._encoded.insert(0, (key, ids))
        del self._encoded[2 * MEMORIES :]
        return ids

    def _middle(self, typed: str) -> tuple[list[int], bytes]:
        """Ids of the typed middle minus its last pre-token piece, and that piece's bytes (to heal)."""
        if not typed:
            return [], b""
        tok = self.tokenizer
        pieces = tok.pretokenize(typed)
        last_start = pieces[-1][1][0]
        heal = typed[last_start:].encode("utf-8", "surrogatepass")
        if len(heal) > MAX_HEAL_BYTES:  # a long run (minified line, wide whitespace): not worth healing
            return tok.encode(typed), b""
        ids = tok.encode(typed[:last_start]) if last_start else []
        return ids, heal
