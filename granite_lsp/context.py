"""Context from other files: snippets of open documents put in front of the FIM prompt.

Each snippet becomes a ``<|filename|>path\\n<text>`` block. The blocks sit at the very start of the
prompt, so any change to them re-processes everything after; they are therefore kept in a *stable*
order (first seen first), a block's text is only refreshed when its document is edited (which, while
the user types elsewhere, is never), and the current document is never part of its own context.

Only text the client has sent us is used (open documents): no URI is ever followed to read a file.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from .tokens import TextTokenizer

CHUNK_LINES = 30


@dataclass
class _Chunk:
    uri: str
    start: int  # first line
    text: str
    order: int  # when first seen: the position in the prompt
    touched: int  # when last opened/edited: what survives the budget
    ids: list[int] | None = None


def _display_path(uri: str) -> str:
    parsed = urlparse(uri)
    return unquote(parsed.path).lstrip("/") if parsed.scheme == "file" else uri


@dataclass
class ContextRing:
    max_chunks: int = 16
    _chunks: dict[tuple[str, int], _Chunk] = field(default_factory=dict)
    _clock: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def region(line: int) -> tuple[int, int]:
        """The line range remembered for an edit at ``line``: fixed windows, so nearby edits share one."""
        half = CHUNK_LINES // 2
        start = max(0, (line // half) * half - half) if line else 0
        return start, start + CHUNK_LINES

    def note(self, uri: str, start: int, snippet: str) -> None:
        """Remember ``snippet``, the text of ``uri`` in the region starting at line ``start``."""
        snippet = snippet.strip("\n")
        now = next(self._clock)
        with self._lock:
            key = (uri, start)
            chunk = self._chunks.get(key)
            if chunk is None:
                self._chunks[key] = _Chunk(uri, start, snippet, now, now)
                if len(self._chunks) > self.max_chunks:
                    oldest = min(self._chunks.values(), key=lambda c: c.touched)
                    del self._chunks[(oldest.uri, oldest.start)]
            else:
                chunk.touched = now
                if chunk.text != snippet:
                    chunk.text, chunk.ids = snippet, None

    def forget(self, uri: str) -> None:
        with self._lock:
            for key in [k for k in self._chunks if k[0] == uri]:
                del self._chunks[key]

    def ids(self, current_uri: str, tokenizer: TextTokenizer, budget: int) -> list[int]:
        """The context blocks for a prompt in ``current_uri``, at most ``budget`` tokens."""
        if budget <= 0:
            return []
        with self._lock:
            candidates = [c for c in self._chunks.values() if c.uri != current_uri and c.text.strip()]
            for c in candidates:
                if c.ids is None:
                    body = tokenizer.encode(f"{_display_path(c.uri)}\n{c.text}\n")
                    c.ids = [tokenizer.control.filename, *body]
            chosen, used, seen = [], 0, set()
            for c in sorted(candidates, key=lambda c: -c.touched):  # the most recent regions win the budget
                if c.text in seen or used + len(c.ids) > budget:
                    continue
                seen.add(c.text)
                chosen.append(c)
                used += len(c.ids)
            chosen.sort(key=lambda c: c.order)  # ... but keep their places, so the prompt rarely moves
            return [tid for c in chosen for tid in c.ids]
