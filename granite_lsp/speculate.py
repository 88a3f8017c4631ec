"""Draft tokens for speculative decoding, looked up in the text the model already sees.

Code completions copy: identifiers, a call written above, the rest of a line that the suffix repeats,
the next lines of a pattern. So the cheapest drafter there is ("prompt lookup"): find the last few
tokens (an n-gram) earlier in what the model sees (context files, prefix, suffix, and the middle
generated so far), and propose the tokens that followed them there. The engine verifies the drafts
in one forward of several rows (the streaming kernels read the weights once for up to 16 rows, so a
verify costs about one step) and keeps the longest prefix the model agrees with: greedy output is
the same with and without drafts. No match, no draft: the step is a plain one-token step.

Nothing here decides what is generated; a wrong draft only costs the extra rows of one forward and
its rollback (runtime/state.py's Journal; bench/verify_cost.py measures it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

# Draft tokens per verify at most. A verify of k + 1 rows stays in the streaming kernels (up to 16
# rows, ops.GEMV_MAX_ROWS), whose cost is the weights' bytes: the extra rows' arithmetic and the
# scan are what grows with k. A completion's copied run (the rest of an identifier, a repeated line)
# is often longer than 4 tokens; past 8, a wrong guess costs rows for tokens that a long match
# rarely gets right anyway. bench/verify_cost.py gives the cost of k rows against one.
MAX_DRAFT = 8
# The n-gram to look up: the last MAX_NGRAM tokens, then shorter down to MIN_NGRAM. One token alone
# matches nearly everywhere in code ("(", ".", a space) and its continuations are mostly wrong;
# two or three tokens are an identifier with its punctuation, or a piece of a line.
MAX_NGRAM = 3
MIN_NGRAM = 2


class Drafter(Protocol):
    """What the engine asks for drafts: it appends every token it generates, and asks for up to
    ``limit`` tokens to follow them."""

    def append(self, token: int) -> None: ...

    def propose(self, limit: int = MAX_DRAFT) -> list[int]: ...


# Makes a request's drafter from its prompt ids and the tokens that end generation.
DraftSource = Callable[[list[int], frozenset[int]], Drafter]


class PromptLookup:
    """Proposes drafts from a growing token history: the prompt, then every generated token."""

    def __init__(self, prompt: Iterable[int], never: Iterable[int] = ()) -> None:
        ids = np.fromiter(prompt, dtype=np.int64)
        self._buf = np.empty(max(64, 2 * len(ids)), dtype=np.int64)
        self._buf[: len(ids)] = ids
        self._n = len(ids)
        # Tokens a draft stops before (the stop ids: when the model picks one, generation ends, so
        # feeding it could never be useful).
        self._never = np.fromiter(never, dtype=np.int64)

    def __len__(self) -> int:
        return self._n

    def append(self, token: int) -> None:
        if self._n == len(self._buf):
            grown = np.empty(2 * len(self._buf), dtype=np.int64)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n] = token
        self._n += 1

    def propose(self, limit: int = MAX_DRAFT) -> list[int]:
        """Up to ``limit`` tokens that followed the most recent earlier occurrence of the history's
        last n-gram (the longest n in MAX_NGRAM..MIN_NGRAM that occurs); [] when none does."""
        if limit <= 0:
            return []
        seq = self._buf[: self._n]
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if self._n <= n:
                continue
            key = seq[-n:]
            # candidate starts p with seq[p : p + n] == key and at least one token after them
            # (p + n < len - ... the occurrence at the very end is the key itself)
            starts = np.flatnonzero(seq[: self._n - n] == key[0])
            for i in range(1, n):
                starts = starts[seq[starts + i] == key[i]]
            if len(starts):
                p = int(starts[-1]) + n  # the most recent occurrence: nearest, often the same block
                draft = seq[p : p + limit]
                if len(self._never):
                    stop = np.flatnonzero(np.isin(draft, self._never))
                    if len(stop):
                        draft = draft[: stop[0]]
                if len(draft):
                    return [int(t) for t in draft]
        return []
