"""Typing through a suggestion: keystrokes that match the ghost text are answered without the model.

When the user types the first characters of the suggestion shown (or accepts a word or a line of it),
the rest of that suggestion is still the answer, and recomputing it would only make the ghost text
flicker and cost a model call per keystroke.
"""

from __future__ import annotations

from dataclasses import dataclass

from .postprocess import Suggestion


@dataclass(frozen=True)
class _Shown:
    text: str  # the document when the suggestion was made
    cursor: int
    suggestion: Suggestion | None  # None: the model had nothing to suggest here
    alternatives: tuple[Suggestion, ...] = ()  # the other candidates made with it (candidates.py)
    asked: int = 1  # how many candidates were asked for


class SuggestionMemory:
    """The last suggestion made in one document."""

    def __init__(self) -> None:
        self._shown: _Shown | None = None

    def remember(
        self,
        text: str,
        cursor: int,
        suggestion: Suggestion | None,
        alternatives: tuple[Suggestion, ...] = (),
        asked: int = 1,
    ) -> None:
        self._shown = _Shown(text, cursor, suggestion, alternatives, asked)

    def alternatives_at(self, text: str, cursor: int, wanted: int) -> tuple[Suggestion, ...] | None:
        """For a ``lookup`` hit asking for ``wanted`` candidates: the alternatives to answer with, or
        None when they have to be made. Typing through a suggestion gets none (its rest is the answer;
        a model run per keystroke would defeat the purpose); asking again at its very place (cycling)
        gets those made with it, or None when it was made with fewer candidates than wanted."""
        shown = self._shown
        if shown is None or shown.cursor != cursor or shown.text != text:
            return ()
        return shown.alternatives[: wanted - 1] if shown.asked >= wanted else None

    def lookup(self, text: str, cursor: int) -> tuple[bool, Suggestion | None]:
        """(hit, suggestion): the rest of the last suggestion if the document is the one it was made
        for plus a typed prefix of it; at the very same place, also "nothing to suggest"."""
        shown = self._shown
        if shown is None:
            return False, None
        typed = cursor - shown.cursor
        full = shown.suggestion.text if shown.suggestion else ""
        if typed < 0 or (typed and typed >= len(full)) or len(text) != len(shown.text) + typed:
            return False, None
        if not full.startswith(text[shown.cursor : cursor]):
            return False, None
        if text[: shown.cursor] != shown.text[: shown.cursor] or text[cursor:] != shown.text[shown.cursor :]:
            return False, None
        if shown.suggestion is None:
            return True, None
        rest = full[typed:]
        return True, (Suggestion(rest, shown.suggestion.replace) if rest.strip() else None)
