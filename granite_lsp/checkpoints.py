"""Checkpoint policy: where a prefill takes checkpoints, which one a prompt restores, which ones go.

A checkpoint is the model state after a token list (its Mamba snapshot and its positions of a KV
buffer). The policy (state_cache.py's docstring says why each exists):
- at the end of every prompt, thinned to the newest RECENT_ENDS on a token path plus older ones at
  least MIN_CHECKPOINT_GAP apart (``thin_ends``);
- at the prompt layout's marks and every ``interval`` tokens of a long prefill, of two marks closer
  than MIN_CHECKPOINT_GAP only one (``stops``);
- where a preemptible prefill yielded, until a later checkpoint on the same path supersedes it
  (``superseded_resumes``);
- least recently used first out when over the memory cap (``lru_victim``), a restore counting the
  checkpoints below it on the prompt's path as used too (``path_below``).
Functions over the cache's list of checkpoints (``StateCache.checkpoints``): the cache holds the list
and the state, these decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .runtime import KVHold, MambaSnapshot

# Of two marks of the same prefill closer than this, only one gets a checkpoint (see stops).
MIN_CHECKPOINT_GAP = 16
# End-of-prompt checkpoints of a document's current token path kept as they are: backspace and a
# fixed typo restore one of them exactly. Older ones are thinned to MIN_CHECKPOINT_GAP apart.
RECENT_ENDS = 4
# The interval checkpoints' spacing by default (StateCache.interval), ~0.8 s of the real shape on 2 idle
# cores; also the most a request's prefill runs between two looks at whether it is still wanted
# (StateCache.request_chunk).
INTERVAL = 256


@dataclass(eq=False)  # identity: list.remove must not compare token arrays (ambiguous, or a shape error)
class Checkpoint:
    doc: str
    tokens: np.ndarray  # the token ids this state has consumed, in order
    snap: MambaSnapshot
    hold: KVHold  # its positions of the KV buffer they are in, kept while the checkpoint exists
    logits: torch.Tensor  # of the last consumed position: an identical next prompt costs no forward at all
    last_used: int = 0
    end: bool = False  # taken at the end of a prompt (not at a layout mark or an interval)
    resume: bool = False  # where a preemptible prefill yielded: dropped once a later one passes it

    @property
    def pos(self) -> int:
        return len(self.tokens)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def on_path(c: Checkpoint, tokens: np.ndarray) -> bool:
    """Whether ``c``'s tokens are a prefix of ``tokens``."""
    return c.pos <= len(tokens) and common_prefix(c.tokens, tokens) == c.pos


def interval_marks(start: int, end: int, interval: int) -> set[int]:
    """Multiples of ``interval`` in (start, end): where a long prefill takes interval checkpoints."""
    if interval <= 0:
        return set()
    first = (start // interval + 1) * interval
    return set(range(first, end, interval))


def stops(start: int, end: int, marks: tuple[int, ...], structural: set[int]) -> list[int]:
    """Where a prefill from ``start`` to ``end`` stops to take a checkpoint (``end`` last), of the
    ``structural`` positions (the layout's ``marks`` and the interval marks).

    A checkpoint a few tokens after another saves those few tokens and costs a whole state (~23 MB on
    the real shape): of two marks closer than MIN_CHECKPOINT_GAP only one gets a checkpoint, the
    earlier, unless the later is the last mark (the end of the prompt's head, where every keystroke on
    the cursor line starts again): e.g. prefix_len and static_len when the suffix is empty, or an
    interval mark just below static_len. The first mark (the end of the context in front of the file)
    keeps its own: every change of the file's text restarts there, and dropped it would send those to
    the interval mark below, up to 255 tokens back."""
    first_mark, last_mark = min(marks, default=-1), max(marks, default=-1)
    out: list[int] = []
    for m in sorted(m for m in structural if start < m <= end):
        if out and m - out[-1] < MIN_CHECKPOINT_GAP:
            if m == last_mark and out[-1] != first_mark:
                out[-1] = m
            continue
        out.append(m)
    if start < end and (not out or out[-1] != end):
        out.append(end)
    return out


def covered(checkpoints: Sequence[Checkpoint], live: np.ndarray, target: np.ndarray) -> tuple[int, Checkpoint | None]:
    """The longest prefix of ``target`` that the live state (its tokens ``live``; None returned) or a
    checkpoint has consumed, and which."""
    best_pos = 0
    if 0 < len(live) <= len(target) and common_prefix(live, target) == len(live):
        best_pos = len(live)
    best: Checkpoint | None = None
    for c in checkpoints:
        if best_pos < c.pos and on_path(c, target):
            best, best_pos = c, c.pos
    return best_pos, best


def path_below(checkpoints: Sequence[Checkpoint], target: np.ndarray, pos: int) -> list[Checkpoint]:
    """The checkpoints on ``target``'s path below ``pos``, lowest first: a restore at ``pos`` counts them as
    used, since they are the ones an edit higher up restores (the nearest below the edit), and
    least-recently-used eviction would otherwise take them first (restores use the deepest)."""
    return sorted((c for c in checkpoints if c.pos < pos and on_path(c, target)), key=lambda c: c.pos)


def superseded_resumes(checkpoints: Sequence[Checkpoint], doc: str, tokens: np.ndarray) -> list[Checkpoint]:
    """Where background work on ``doc`` yielded, below a new checkpoint at ``tokens`` on the same path: a
    yield point is only worth a whole state until resumed (a long prefill preempted many times would
    otherwise leave one per preemption, evicting the layout's checkpoints)."""
    return [c for c in checkpoints if c.resume and c.doc == doc and c.pos < len(tokens) and on_path(c, tokens)]


def thin_ends(checkpoints: Sequence[Checkpoint], newest: Checkpoint) -> list[Checkpoint]:
    """End-of-prompt checkpoints to drop after ``newest`` was taken. Typing takes one per keystroke, a
    whole state (~23 MB on the real shape) a token or so after the previous one: kept, they filled the
    cache within ~20 keystrokes. The newest RECENT_ENDS on ``newest``'s token path stay; older ones stay
    only at least MIN_CHECKPOINT_GAP tokens above the checkpoint below them, so that returning to one
    that was dropped re-processes fewer tokens than that."""
    path = [c for c in checkpoints if c.doc == newest.doc and on_path(c, newest.tokens)]
    ends = sorted((c for c in path if c.end), key=lambda c: c.pos)
    floors = sorted(c.pos for c in path if not c.end)
    below, i = -MIN_CHECKPOINT_GAP, 0
    dropped = []
    for c in ends[:-RECENT_ENDS]:
        while i < len(floors) and floors[i] < c.pos:
            below = max(below, floors[i])
            i += 1
        if c.pos - below < MIN_CHECKPOINT_GAP:
            dropped.append(c)
        else:
            below = c.pos
    return dropped


def lru_victim(checkpoints: Sequence[Checkpoint], protect: str) -> Checkpoint | None:
    """The least recently used checkpoint but the newest of document ``protect`` (None: no other)."""
    newest = max((c for c in checkpoints if c.doc == protect), key=lambda c: c.last_used, default=None)
    victims = [c for c in checkpoints if c is not newest]
    return min(victims, key=lambda c: c.last_used) if victims else None
