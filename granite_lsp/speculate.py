"""Draft tokens for speculative decoding, looked up in the text the model already sees.

Code completions copy: identifiers, a call written above, the rest of a line that the suffix repeats,
the next lines of a pattern. So the cheapest drafter there is ("prompt lookup"): find the last few
tokens (an n-gram) earlier in what the model sees (context files, prefix, suffix, and the middle
generated so far), and propose the tokens that followed them there. The engine verifies the drafts
in one forward of several rows (the streaming kernels read the weights once for up to 16 rows, so a
verify costs about one step) and keeps the longest prefix the model agrees with: greedy output is
the same with and without drafts, on the packed kernels, the only place the service turns it on
(``StateCache.exact_rows``: on the torch paths a kept row differs by a few 1e-6). No match, no
draft: the step is a plain one-token step.

Nothing here decides what is generated; a wrong draft only costs the extra rows of one forward and
its rollback (runtime/state.py's Journal; bench/verify_cost.py measures it).

A verify runs as one C++ call through every layer, like a plain step (kernels/step.cpp, up to 16 rows; it was ~300
Python-dispatched kernel calls), and writes no Mamba state of its own: the first row goes into the state as a step's
would, the drafts run on a copy, and those a rollback keeps are deferred to the next forward (runtime/state.py's
Journal and ModelState.deferred say how and why). So what a rejected draft costs is its row's arithmetic in the
matmuls, the scan and attention. bench/verify_cost.py measures it against plain steps (the step after the rollback
included); the README has the figures. VerifyCost decides from what it measures on the running machine, and
speculation stays on by default: with the model/tiny fixtures' files as context (bench/spec_fixtures.py --context)
it decodes in ~0.55x plain's time (3.4 tokens per forward), and where drafts are refused it costs at most a draft's
price now and then (EXPLORE_COST).
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
# Drafts of a request's first verify (DraftBudget adapts it to what the model accepts).
START_DRAFT = 4
# VerifyCost's guess of a draft row's cost in plain steps (until measured), its averaging weight of a
# new measurement, and the share of decode time it may spend on a draft while none is worth it.
PRIOR_ROW_COST = 0.2
EWMA = 0.1
EXPLORE_COST = 0.01
# The n-gram to look up: the last MAX_NGRAM tokens, then shorter down to MIN_NGRAM. One token alone
# matches nearly everywhere in code ("(", ".", a space) and its continuations are mostly wrong;
# two or three tokens are an identifier with its punctuation, or a piece of a line.
MAX_NGRAM = 3
MIN_NGRAM = 2


class DraftBudget:
    """How many drafts the next verify may feed, from how the request's earlier verifies went.

    A verify's extra rows cost arithmetic in every matmul and a rollback when rejected (on 2 busy
    cores ~0.04-0.09 of a step per draft: bench/verify_cost.py), and with weights that do not copy the
    prompt (random ones, or text unlike anything above) nearly every draft is rejected. So: start at
    START_DRAFT, double after a verify whose drafts were all accepted (up to MAX_DRAFT), fall back to
    one more than were accepted otherwise, and after a verify that accepted nothing leave out the
    next 1, 2, 4, ... lookups (doubling while nothing is accepted): a model that never agrees pays
    for a draft about once per log2 of the tokens, one that agrees gets long drafts.
    """

    def __init__(self) -> None:
        self.length = START_DRAFT
        self._misses = 0  # verifies in a row that accepted nothing
        self._skip = 0  # lookups still to leave out

    def next(self) -> int:
        """Drafts the next forward may feed (0: a plain step)."""
        if self._skip:
            self._skip -= 1
            return 0
        return self.length

    def update(self, drafted: int, accepted: int) -> None:
        """A verify fed ``drafted`` drafts and the model agreed with the first ``accepted``."""
        if accepted >= drafted:
            self.length = min(MAX_DRAFT, 2 * self.length)
        else:
            self.length = max(1, accepted + 1)
        if accepted:
            self._misses = 0
        else:
            self._skip = 1 << min(self._misses, 10)
            self._misses += 1


class VerifyCost:
    """How many drafts pay on this model and machine, from what the engine measured (across requests).

    A verify of 1 + k rows (its rollback included) costs ``ratio[k]`` plain steps, measured: the verify
    is one call like a step (kernels/step.cpp) and costs a part per row (arithmetic in every matmul, the
    scan, attention); the drafts it keeps are applied by the next step (runtime/state.py's deferred rows),
    whose time counts as a step's (a slight bias towards drafting, ~1-2% of an int8 step per draft kept,
    only when drafts were accepted). On the real shape a rejected draft costs ~4-8% of a step
    (bench/verify_cost.py). With ``accept`` the
    chance that the model agrees with a draft (counted over verifies), k drafts yield
    1 + accept + accept^2 + ... + accept^k tokens for ``ratio[k]`` steps' time: the k with the most
    tokens per step's time is fed, none when no k beats a plain step (1 token per step). Then one
    draft is still fed now and then (costing at most EXPLORE_COST of the steps' time) so that
    ``accept`` follows the text.
    Timings only decide how many drafts: the output is the same whatever they are.
    """

    def __init__(self) -> None:
        self.step_ms = 0.0  # a plain one-row step, EWMA (0: not measured yet)
        # ratio[k]: a verify of k drafts in plain steps, EWMA; a guess until measured (see observe_verify)
        self.ratio = [1.0 + PRIOR_ROW_COST * k for k in range(MAX_DRAFT + 1)]
        self._measured = [False] * (MAX_DRAFT + 1)
        self._agreed, self._refused = 1.0, 1.0  # decayed counts: drafts accepted / verifies cut short
        self._since_verify = 0

    @property
    def accept(self) -> float:
        return self._agreed / (self._agreed + self._refused)

    def limit(self) -> int:
        """Drafts worth feeding in the next forward (0: a plain step)."""
        self._since_verify += 1
        a = self.accept
        best_k, best, tokens, p = 0, 1.0, 1.0, 1.0
        for k in range(1, MAX_DRAFT + 1):
            p *= a
            tokens += p
            if tokens / self.ratio[k] > best:
                best_k, best = k, tokens / self.ratio[k]
        # exploring costs (ratio[1] - 1) steps once per so many forwards: at most EXPLORE_COST of them
        return best_k if best_k else int(self._since_verify * EXPLORE_COST >= self.ratio[1] - 1.0)

    def observe_step(self, ms: float) -> None:
        self.step_ms = ms if not self.step_ms else self.step_ms + EWMA * (ms - self.step_ms)

    def observe_verify(self, drafted: int, accepted: int, ms: float) -> None:
        """A verify (and its rollback) of ``drafted`` drafts took ``ms``; the model agreed with ``accepted``."""
        self._since_verify = 0
        keep = 1.0 - EWMA
        self._agreed = keep * self._agreed + accepted
        self._refused = keep * self._refused + (accepted < drafted)
        if not self.step_ms or not 1 <= drafted <= MAX_DRAFT:
            return
        got = ms / self.step_ms
        if self._measured[drafted]:
            self.ratio[drafted] += EWMA * (got - self.ratio[drafted])
        else:
            self._measured[drafted] = True
            self.ratio[drafted] = got
        # draft counts not measured yet: from this one's cost, fewer in proportion (they get measured
        # when tried), more with the guessed cost of the rows between
        for k in range(1, MAX_DRAFT + 1):
            if not self._measured[k]:
                more = self.ratio[drafted] + PRIOR_ROW_COST * (k - drafted)
                self.ratio[k] = more if k > drafted else 1.0 + (self.ratio[drafted] - 1.0) * k / drafted


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
