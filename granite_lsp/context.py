"""Context from other files, and the current file's name: what goes in front of the FIM prompt.

The prompt takes the repository-level form of the Granite / StarCoder family, where a repository is
files concatenated, each introduced by ``<|filename|>`` and its path (StarCoder's ``<filename>``,
StarCoder2's ``<file_sep>``), and the file being completed is the last one, in FIM form:

    <|filename|>src/util.py\n<snippet>\n ... <|filename|>src/app.py\n<|fim_prefix|>...<|fim_suffix|>...<|fim_middle|>

Paths are relative to the workspace folder that holds the file (from initialize's workspaceFolders or
rootUri); a file outside every folder is named by its file name alone, and a document that is not a file
(``untitled:``) gets no name. The name tells the model the language, which an empty file does not.

Each snippet becomes a ``<|filename|>path\n<text>`` block. The blocks sit at the very start of the
prompt, so any change to them re-processes everything after; they are therefore kept in a *stable*
order (first seen first), a block's text is only refreshed when its document is edited (which, while
the user types elsewhere, is never), and the current document is never part of its own context. The
current file's ``<|filename|>`` line comes last, right before ``<|fim_prefix|>``: it only changes when the
user switches files, which changes everything after it anyway.

Only text the client has sent us is used (open documents): no URI is ever followed to read a file.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

from .tokens import TextTokenizer

log = logging.getLogger(__name__)

CHUNK_LINES = 30


@dataclass
class _Chunk:
    uri: str
    start: int  # first line
    text: str
    order: int  # when first seen: the position in the prompt
    touched: int  # when last opened/edited: what survives the budget
    ids: list[int] | None = None


def _file_path(uri: str) -> str | None:
    """The path of a ``file:`` URI (posix separators), None for any other scheme."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    path = unquote(parsed.path)
    if len(path) > 2 and path[0] == "/" and path[2] == ":":  # file:///c:/x -> c:/x
        path = path[1:]
    return path.replace("\\", "/")


def workspace_roots(params: Any) -> list[str]:
    """The workspace folders' paths from initialize's params (workspaceFolders, else rootUri, else rootPath)."""
    uris = [f.uri for f in (getattr(params, "workspace_folders", None) or [])]
    if not uris and getattr(params, "root_uri", None):
        uris = [params.root_uri]
    roots = [p for p in (_file_path(u) for u in uris) if p]
    if not roots and getattr(params, "root_path", None):
        roots = [str(params.root_path).replace("\\", "/")]
    return [r.rstrip("/") or "/" for r in roots]


def display_path(uri: str, roots: list[str] | tuple[str, ...] = ()) -> str | None:
    """``uri``'s path relative to the innermost workspace root holding it; the file name when none does;
    None for a document that is not a file."""
    path = _file_path(uri)
    if path is None:
        return None
    for root in sorted(roots, key=len, reverse=True):
        if path.startswith(root.rstrip("/") + "/"):
            return posixpath.relpath(path, root)
    return posixpath.basename(path) or None


@dataclass
class ContextRing:
    max_chunks: int = 16
    roots: tuple[str, ...] = ()  # workspace folders: paths are shown relative to them
    _chunks: dict[tuple[str, int], _Chunk] = field(default_factory=dict)
    _clock: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
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

    def set_roots(self, roots: list[str]) -> None:
        """Name files relative to these workspace folders from now on (blocks are re-encoded)."""
        with self._lock:
            self.roots = tuple(roots)
            for chunk in self._chunks.values():
                chunk.ids = None

    def header(self, uri: str, tokenizer: TextTokenizer) -> list[int]:
        """``<|filename|>path\\n`` for the file being completed, [] when it has no file name."""
        path = display_path(uri, self.roots)
        return [tokenizer.control.filename, *tokenizer.encode(f"{path}\n")] if path else []

    def ids(self, current_uri: str, tokenizer: TextTokenizer, budget: int, filename: bool = True) -> list[int]:
        """The context blocks for a prompt in ``current_uri`` (at most ``budget`` tokens), followed by the
        current file's own ``<|filename|>`` line when ``filename`` (outside the budget: it is a few tokens)."""
        own = self.header(current_uri, tokenizer) if filename else []
        if budget <= 0:
            return own
        with self._lock:
            candidates: list[tuple[_Chunk, list[int]]] = []
            for c in self._chunks.values():
                if c.uri == current_uri or not c.text.strip():
                    continue
                if c.ids is None:
                    try:
                        name = display_path(c.uri, self.roots) or c.uri
                        body = tokenizer.encode(f"{name}\n{c.text}\n")
                    except Exception as e:
                        # Another file's text must never fail this file's request: leave that block out.
                        log.warning("context from another document left out: %s: %s", type(e).__name__, e)
                        continue
                    c.ids = [tokenizer.control.filename, *body]
                candidates.append((c, c.ids))
            chosen: list[tuple[_Chunk, list[int]]] = []
            used, seen = 0, set()
            for c, ids in sorted(candidates, key=lambda pair: -pair[0].touched):  # the most recent regions win
                if c.text in seen or used + len(ids) > budget:
                    continue
                seen.add(c.text)
                chosen.append((c, ids))
                used += len(ids)
            chosen.sort(key=lambda pair: pair[0].order)  # ... but keep their places, so the prompt rarely moves
            return [tid for _, ids in chosen for tid in ids] + own
