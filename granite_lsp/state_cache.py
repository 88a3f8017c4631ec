"""Model-state reuse between requests: checkpoints of the recurrent state, attention KV shared by branch.

A Mamba2 layer's state summarises every token it has seen and cannot be rolled back; attention KV can
simply be cropped. So for each new prompt we find the longest already-processed prefix we hold a
*checkpoint* for (a snapshot of all Mamba states at that position, plus the KV buffer it belongs to),
restore it, and run the model over the rest only.

Checkpoint policy (checkpoints.py decides it; see ``docs`` in fim.py for the layout it is designed for):
- at the end of every prompt: the next keystroke usually extends it (typing forward, Enter) or equals it
  (typing inside a healed word), and a few recent ones cover backspace and a typo fixed;
- at ``<|fim_middle|>`` (the end of prefix + suffix): survives any edit inside the middle region (of
  marks closer than MIN_CHECKPOINT_GAP only one keeps a checkpoint, and this one wins);
- every ``interval`` tokens of a long prefill: an edit high up in the file re-processes from the nearest
  one below it, not from the top. They also cover moving the cursor elsewhere and back. A restore
  counts the checkpoints below it on the prompt's path as used, so that eviction (least recently used
  first) takes other paths' checkpoints before these.
- where a preemptible prefill (background work ahead of a request) yields: it resumes from there, and
  the checkpoint is dropped once a later checkpoint on the same path supersedes it.
Memory is capped across documents, least recently used first.

A prefill given ``should_yield`` is preemptible: it runs in pieces of at most ``chunk`` tokens, asks
between two pieces, and when told to yield keeps a checkpoint where it stopped and returns unfinished.
The next prefill of a prompt that extends those tokens restores that checkpoint like any other, so an
interrupted prefill loses no work, and the result does not depend on where it was cut (same forward
pieces as a prefill that stops at a mark there).

A piece costs a whole forward's fixed cost (every weight streamed once, as in a decode step: bench/
piece_cost.py) plus its tokens', so a piece small enough to wait for is a slow way to prefill. Given
``interrupt`` as well (a request is waiting), a preemptible prefill also looks between two *layers* of
a piece. The invariant: the live state always matches ``live_tokens`` at a piece boundary, never
between two. A Mamba layer's state advanced over a piece's tokens while the layers above it have not is
no state of any token list, so a piece asked to stop midway either finishes (when what is left of it is
estimated at no more than ``finish_ms``, FINISH_MS by default: the wait stays bounded and its work is
kept) or is abandoned: the live state goes back to the piece's start (the piece's forward is journaled
whole, runtime/state.py's Journal: the copies of the Mamba states taken at its start are swapped back
in; the KV positions the piece wrote lie beyond the cache's length and are overwritten later) and the
prefill yields there, as if it had been told to yield before that piece. Either way it
stops at a piece boundary, so exactness is as above; an abandoned piece costs its work so far (< a piece).

KV buffers are shared by the checkpoints of one branch of token history and copied on write: each
checkpoint holds its positions of the buffer (``KVCache.hold``), and the runtime branches the buffer
before a write that would overwrite a held position (``ModelState.prepare``). This module is policy
only: which checkpoints to take, keep and restore.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoints as policy
from . import memory
from .checkpoints import INTERVAL, MIN_CHECKPOINT_GAP, RECENT_ENDS, Checkpoint
from .runtime import HybridModel, Interrupted, KVHold, MambaSnapshot, ModelState
from .runtime.matmul import small_ops_single_threaded
from .runtime.rows import fork_row, step_rows

# Prefills of at least this many tokens hand their freed activations back to the OS (memory.py).
RELEASE_AFTER_TOKENS = 256
# Tokens a preemptible prefill runs between two ``should_yield`` checks, and the checkpoint granularity
# it resumes from. A request no longer waits for a whole piece (``interrupt``: one layer, or the rest of
# a piece within FINISH_MS), so this trades what an abandoned piece loses against a piece's fixed cost
# (a whole forward's weights streamed once): bench/piece_cost.py measured (real shape, bf16, 2 threads,
# depth 1,500, a loaded shared machine) a piece at 235 ms + 13.4 ms a token: per token, a 32-token piece
# cost 1.46x a 64-token one. Pieces of 32 measured 120-210 ms on a quiet machine. Larger pieces would
# make work ahead faster (not measured on the traces yet: issue 15's report says so).
PREEMPT_CHUNK = 32
# A piece asked to stop between two layers (a request is waiting) finishes when what is left of it is
# estimated (its time so far per layer, times the layers left) at no more than this, and is abandoned
# otherwise (module docstring): the request waits at most about this, or one layer plus a restore.
FINISH_MS = 30.0
__all__ = ["INTERVAL", "MIN_CHECKPOINT_GAP", "RECENT_ENDS", "CacheStats", "Checkpoint", "PrefillResult", "StateCache"]


@dataclass
class PrefillResult:
    logits: torch.Tensor
    prompt_tokens: int
    reused_tokens: int
    processed_tokens: int
    prefill_ms: float
    # False when a preemptible prefill yielded before the end: ``logits`` are then those of the last
    # position it reached (``reused_tokens + processed_tokens``), not the prompt's (empty when that is
    # no position: its first piece from the empty state was abandoned).
    complete: bool = True


@dataclass
class CacheStats:
    prefills: int = 0
    tokens_reused: int = 0
    tokens_processed: int = 0
    checkpoints_taken: int = 0
    evictions: int = 0
    thinned: int = 0  # older end-of-prompt checkpoints dropped for a nearby one (see _thin_ends)
    yields: int = 0  # preemptible prefills that stopped early (a checkpoint kept where they stopped)
    # Pieces asked to stop between two layers (``interrupt``): finished (what was left was short) or
    # abandoned (the state restored to the piece's start), and the tokens the abandoned ones had run.
    pieces_finished: int = 0
    pieces_abandoned: int = 0
    abandoned_tokens: int = 0
    forks_refused: int = 0  # candidates' state copies not made: they would not fit under max_bytes
    peak_bytes: int = 0  # the most ``nbytes()`` (+ forks) has been once an eviction made room (see _evict)
    decode_forwards: int = 0  # step, verify and step_rows calls (the service counts those before the first text)


def _mamba_nbytes(state: ModelState) -> int:
    """What a snapshot of ``state`` holds: its Mamba conv and SSM states."""
    return sum(t.numel() * t.element_size() for t in (*state.conv, *state.ssm))


def _live_extra(state: ModelState) -> int:
    """What the live state holds besides its KV buffer: Mamba states and a verify's journal buffers."""
    return state.nbytes - state.kv.nbytes


@dataclass
class StateCache:
    """One live model state plus checkpoints; ``enabled=False`` re-processes every prompt from zero."""

    model: HybridModel
    max_bytes: int = 512 << 20
    interval: int = INTERVAL
    enabled: bool = True
    max_per_doc: int = 24
    chunk: int = PREEMPT_CHUNK
    finish_ms: float = FINISH_MS
    stats: CacheStats = field(default_factory=CacheStats)

    @property
    def request_chunk(self) -> int:
        """A request's prefill looks at whether it is still wanted (a newer keystroke or $/cancelRequest
        made it stale: it stops there, its work kept as a checkpoint) between pieces of at most this many
        tokens: the interval checkpoints' spacing. With reuse on and the interval marks no more than that
        apart, the interval marks cut a prefill there anyway (no GEMM gets smaller); with reuse off, or
        stops further apart, these cuts are extra ones. No interval (0): the default spacing."""
        return self.interval if self.interval > 0 else INTERVAL

    def __post_init__(self) -> None:
        # The KV buffers grow (doubling) as prompts need: a short file never holds a long one's room.
        self.live = self.model.new_state(capacity=256)
        self._zero = self.model.zero_snapshot()  # restoring it copies zeros in; it holds no memory
        self.live_tokens: list[int] = []
        self.live_logits: torch.Tensor | None = None
        self._verified = torch.empty(0)  # the last verify's logits (keep picks the row that stays)
        # The checkpoint the live state is bit for bit (restored from it, or just taken of it); None once
        # a forward moved on. Weak: an evicted checkpoint's memory must not stay held through it.
        self._origin: weakref.ref[Checkpoint] | None = None
        self.checkpoints: list[Checkpoint] = []
        self._tick = itertools.count(1)

    # ---- public -------------------------------------------------------------------------------------

    def prefill(
        self,
        doc: str,
        ids: list[int],
        marks: tuple[int, ...] = (),
        should_yield: Callable[[], bool] | None = None,
        chunk: int | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> PrefillResult:
        """Bring the live state to the end of ``ids`` and return the last position's logits.

        With ``should_yield``: preemptible (module docstring), in pieces of at most ``chunk`` tokens
        (default ``self.chunk``); ``complete`` says whether it got there. ``interrupt`` (preemptible
        prefills only): asked between two layers of a piece, True when a request waits (module docstring).
        """
        if not ids:
            raise ValueError("empty prompt")
        t0 = time.perf_counter()
        target = np.asarray(ids, dtype=np.int64)
        start, logits = self._restore_best(doc, target)
        structural = set(marks) | (policy.interval_marks(start, len(ids), self.interval) if self.enabled else set())
        pos, yielded = start, False
        size = max(1, self.chunk if chunk is None else chunk)
        for stop in policy.stops(start, len(ids), marks, structural):
            while pos < stop and not yielded:
                piece = stop if should_yield is None else min(stop, pos + size)
                if should_yield is not None and interrupt is not None:
                    out = self._piece(target[pos:piece], interrupt)
                    if out is None:  # abandoned: the state is back at ``pos``, where it yields
                        yielded = True
                        break
                    logits = out
                else:
                    logits = self._run(target[pos:piece])
                pos = piece
                if self.enabled and pos == stop:
                    self._checkpoint(doc, end=stop not in structural)
                yielded = pos < len(ids) and should_yield is not None and should_yield()
            if yielded:
                if self.enabled and pos != stop and pos > 0:
                    self._checkpoint(doc, resume=True)  # where it stopped: the next prefill resumes here
                self.stats.yields += 1
                break
        if logits is None:  # abandoned its first piece from the empty state: no position reached
            assert pos == 0
            logits = torch.empty(0)
        if pos - start >= RELEASE_AFTER_TOKENS and not yielded:
            # A long prefill's activations. Not when it yielded: a request waits for this return (a trim
            # walks the whole heap), a yielding prefill ran in pieces whose activations are small, and the
            # prefill that completes later trims.
            memory.release()
        ms = (time.perf_counter() - t0) * 1000.0
        self.stats.prefills += 1
        self.stats.tokens_reused += start
        self.stats.tokens_processed += pos - start
        self._evict(protect=doc)
        return PrefillResult(logits, len(ids), start, pos - start, ms, complete=pos == len(ids))

    def origin(self) -> Checkpoint | None:
        """The checkpoint whose state the live state is exactly (restored from it or just taken of it), or
        None. What was decoded from a state holds again from the same state (engine.py's trail)."""
        origin = self._origin() if self._origin is not None else None
        return origin if origin is not None and origin in self.checkpoints else None

    def starts_from(self, ids: list[int]) -> Checkpoint | None:
        """The checkpoint whose state a prefill of ``ids`` would continue from now (restored, or the live
        state's ``origin`` when the live state covers the most), or None. Changes nothing."""
        if not self.enabled or not ids:
            return None
        pos, best = self._covered(np.asarray(ids, dtype=np.int64))
        if best is not None:
            return best
        origin = self.origin()
        return origin if pos and origin is not None and origin.pos == pos else None

    def remaining(self, ids: list[int]) -> int:
        """Tokens of ``ids`` a prefill would process now: those after the longest prefix held by the live
        state or a checkpoint (what ``prefill`` would restore). Changes nothing."""
        if not self.enabled:
            return len(ids)
        target = np.asarray(ids, dtype=np.int64)
        return len(ids) - self._covered(target)[0]

    def step(self, token: int) -> torch.Tensor:
        """Feed one generated token to the live state (decode)."""
        self.stats.decode_forwards += 1
        return self._run(np.asarray([token], dtype=np.int64))

    def verify(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` (a generated token, then draft tokens after it) in one journaled forward and
        return every row's logits [len(ids), vocab]; ``keep`` then says how many stay consumed
        (speculative decoding: speculate.py)."""
        self.stats.decode_forwards += 1
        self.live.journal_next()
        self._verified = self._run(np.asarray(ids, dtype=np.int64), all_logits=True)
        return self._verified

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` in one forward that stays whole (tokens taken from the engine's trail and the one
        after them) and return every row's logits [len(ids), vocab]: the rows ``verify`` gives, without a
        journal (nothing of it will be taken back)."""
        self.stats.decode_forwards += 1
        return self._run(np.asarray(ids, dtype=np.int64), all_logits=True)

    def keep(self, n: int) -> None:
        """Keep the first ``n`` >= 1 tokens of the last ``verify``: the live state (tokens, logits, model
        state) is then the one that feeding just those tokens would have left."""
        rows = len(self._verified)
        try:
            self.model.keep(self.live, n)
        except BaseException:
            self._restore(self._zero, None, [], None)  # as after a failed forward (_run)
            raise
        del self.live_tokens[len(self.live_tokens) - rows + n :]
        self.live_logits = self._verified[n - 1]
        self._origin = None

    @property
    def exact_rows(self) -> bool:
        """Whether a verify-then-keep (speculative decoding) and the batched rows of several candidates
        give logits bit for bit equal to plain one-token steps: only on the model's packed CPU kernels.
        The torch paths (GPU, MPS, no compiler) differ by a few 1e-6 after ``keep`` or in a batched
        row, which can flip a near-tie; there the service decodes one token at a time and one
        candidate (service.py). The one place this is decided."""
        return self.model.packed

    def branches(self, n: int, room: int, protect: str) -> list[ModelState]:
        """Up to ``n`` independent copies of the live state as it is now (each its own Mamba states and
        KV buffers, with room for ``room`` more tokens, not the live buffers' whole capacity): alternative
        candidates decode on them while the live state stays as it is. Their bytes count against
        ``max_bytes`` with the checkpoints' and the live state's (a copy is ~35 MB at 1.6k tokens on the
        real shape): least recently used checkpoints go to make room (the newest of ``protect`` stays),
        and fewer copies are made where even then they would not fit (``stats.forks_refused``)."""
        forks: list[ModelState] = []
        held = 0
        with small_ops_single_threaded():
            while len(forks) < n:
                fork = fork_row(self.live, room)
                self._evict(protect, extra=held + fork.nbytes)
                if self.nbytes() + held + fork.nbytes > self.max_bytes:
                    self.stats.forks_refused += n - len(forks)
                    break
                forks.append(fork)
                held += fork.nbytes
        return forks

    def step_rows(self, tokens: list[int], states: list[ModelState | None]) -> torch.Tensor:
        """One decode step for several states at once (runtime/rows.py), ``None`` standing for the live
        state; logits [rows, vocab]. A failure leaves the live state empty, as ``_run`` does."""
        rows = [self.live if s is None else s for s in states]
        self.stats.decode_forwards += 1
        try:
            logits = step_rows(self.model, tokens, rows)
        except BaseException:
            self._restore(self._zero, None, [], None)
            raise
        for token, s, row_logits in zip(tokens, states, logits, strict=True):
            if s is None:
                self._origin = None
                self.live_tokens.append(token)
                self.live_logits = row_logits
        return logits

    def forget(self, doc: str) -> None:
        self.checkpoints = [c for c in self.checkpoints if c.doc != doc]

    def nbytes(self) -> int:
        """Every byte the cache holds, what ``max_bytes`` caps: the checkpoints' Mamba snapshots, each KV
        buffer a checkpoint or the live state is on (once), the live state's own Mamba states and
        journal buffers (~23 MB, and on the real shape ~22 MB of states once a piece was journaled whole
        and ~6 MB of a verify's scan rows: left out until issue 15's accounting),
        and the logits kept (by their storage: a row of a verify's logits keeps all its rows)."""
        kvs = {id(c.hold.kv): c.hold.kv for c in self.checkpoints}
        kvs[id(self.live.kv)] = self.live.kv
        logits = [c.logits for c in self.checkpoints] + [self._verified]
        if self.live_logits is not None:
            logits.append(self.live_logits)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in logits}
        snapshots = sum(c.snap.nbytes for c in self.checkpoints)
        return snapshots + sum(kv.nbytes for kv in kvs.values()) + _live_extra(self.live) + sum(storages.values())

    # ---- internals ----------------------------------------------------------------------------------

    def _restore_best(self, doc: str, target: np.ndarray) -> tuple[int, torch.Tensor | None]:
        """Restore the state that has consumed the longest prefix of ``target``.

        Returns its length and, when that is all of ``target``, the logits that follow it.
        """
        if not self.enabled:
            self._restore(self._zero, None, [], None)
            return 0, None
        best_pos, best = self._covered(target)
        logits = self.live_logits if best_pos and best is None else None
        for c in policy.path_below(self.checkpoints, target, best_pos):  # count as used (path_below: why)
            c.last_used = next(self._tick)
        used = best if best is not None else self.origin() if best_pos else None  # the live state's own counts
        if used is not None:
            used.last_used = next(self._tick)
        if best is not None:
            self._restore(best.snap, best.hold, best.tokens.tolist(), best.logits, origin=best)
            logits = best.logits
        elif best_pos == 0 and len(self.live_tokens):
            self._restore(self._zero, None, [], None)
        return best_pos, logits

    def _covered(self, target: np.ndarray) -> tuple[int, Checkpoint | None]:
        """The longest prefix of ``target`` the live state (None) or a checkpoint has consumed."""
        return policy.covered(self.checkpoints, np.asarray(self.live_tokens, dtype=np.int64), target)

    def _restore(
        self,
        snap: MambaSnapshot,
        hold: KVHold | None,
        tokens: list[int],
        logits: torch.Tensor | None,
        origin: Checkpoint | None = None,
    ) -> None:
        """Continue from ``snap`` on the KV buffer a checkpoint holds (None: the live one)."""
        # A restore or a snapshot copies the Mamba states (~21 MB on the real shape): memory-bound, and on
        # one thread. torch's threaded copy_ on 2 busy cores took 0.75-1.7 s per restore + snapshot against
        # 40-145 ms on one thread (same run): it was most of a keystroke's time to its first visible text.
        with small_ops_single_threaded():
            self.live.restore(snap, hold)
        self.live_tokens = tokens
        self.live_logits = logits
        self._origin = weakref.ref(origin) if origin is not None else None

    def _piece(self, ids: np.ndarray, interrupt: Callable[[], bool]) -> torch.Tensor | None:
        """One piece of a preemptible prefill that looks at ``interrupt`` between two layers: its logits,
        or None when it was abandoned (the live state is then back at the piece's start; module
        docstring). The forward is journaled whole (runtime/state.py's Journal: the Mamba states copied
        first, ~1% of a piece's time on the real shape: bench/piece_cost.py), unless it cannot stop (a
        one-call forward: HybridModel.interruptible). Abandoned, the live state is exactly the piece's
        start again (tokens, logits and ``origin`` untouched: the forward raised before ``_run`` moved
        them), so the checkpoint it was (``origin``: the engine's trail) still holds. Should the undo fail
        (a bug), the live state starts over from empty and the error propagates, as a failed ``_run``."""
        if not self.model.interruptible(len(ids)):
            return self._run(ids)
        self.live.journal_next(whole=True)
        t0 = time.perf_counter()
        asked = [False]

        def stop(done: int, layers: int) -> bool:
            if not interrupt():
                return False
            left_ms = (time.perf_counter() - t0) * 1000.0 * (layers - done) / done
            if left_ms <= self.finish_ms:
                asked[0] = True  # finishes: it will be asked again, and the estimate only shrinks
                return False
            return True

        try:
            out = self._run(ids, interrupt=stop)
        except Interrupted:
            try:
                self.live.undo()
            except BaseException:
                # Not taken back: the Mamba layers are advanced to different tokens, the state of no
                # token list. Start over from empty, as after a failed forward (_run).
                self._restore(self._zero, None, [], None)
                raise
            self.stats.pieces_abandoned += 1
            self.stats.abandoned_tokens += len(ids)
            return None
        self.stats.pieces_finished += asked[0]
        return out

    def _run(
        self, ids: np.ndarray, all_logits: bool = False, interrupt: Callable[[int, int], bool] | None = None
    ) -> torch.Tensor:
        try:
            logits = self.model.forward(torch.from_numpy(ids), self.live, all_logits=all_logits, interrupt=interrupt)
        except Interrupted:
            raise  # a preemptible piece's: its caller takes the journaled forward back (_piece)
        except BaseException:
            # The live state is updated in place, layer by layer and piece by piece: after a failure
            # (out of memory, ...) it matches no token list. Start over from empty, never from it.
            self._restore(self._zero, None, [], None)
            raise
        self.live_tokens.extend(ids.tolist())
        self.live_logits = logits[-1] if all_logits else logits
        self._origin = None
        return logits

    def _checkpoint(self, doc: str, end: bool = False, resume: bool = False) -> None:
        pos = self.live.pos
        tokens = np.asarray(self.live_tokens, dtype=np.int64)
        for c in policy.superseded_resumes(self.checkpoints, doc, tokens):
            self.checkpoints.remove(c)
        for c in self.checkpoints:
            if c.pos == pos and c.doc == doc and np.array_equal(c.tokens, tokens):
                c.last_used = next(self._tick)
                c.end = c.end and end  # a layout mark stays one
                c.resume = c.resume and resume
                return
        # Room first: the new snapshot (the live Mamba states' size; its KV hold is on the live buffer,
        # already counted) never takes the cache above its cap, not even until the prefill ends.
        self._evict(protect=doc, extra=_mamba_nbytes(self.live))
        with small_ops_single_threaded():
            snap = self.live.snapshot()
        assert self.live_logits is not None  # a checkpoint is taken after a forward
        new = Checkpoint(doc, tokens, snap, self.live.kv.hold(), self.live_logits, next(self._tick), end, resume)
        self.checkpoints.append(new)
        self._origin = weakref.ref(new)  # the live state is this snapshot
        self.stats.checkpoints_taken += 1
        if end:
            for c in policy.thin_ends(self.checkpoints, new):
                self.checkpoints.remove(c)
                self.stats.thinned += 1
        mine = [c for c in self.checkpoints if c.doc == doc]
        if len(mine) > self.max_per_doc:
            oldest = min(mine, key=lambda c: c.last_used)
            self.checkpoints.remove(oldest)
            self.stats.evictions += 1

    def _evict(self, protect: str, extra: int = 0) -> None:
        """Drop least recently used checkpoints until under the memory cap, ``extra`` bytes held besides
        (candidates' forks) included; the newest of ``protect`` stays."""
        while self.checkpoints and self.nbytes() + extra > self.max_bytes:
            victim = policy.lru_victim(self.checkpoints, protect)
            if victim is None:
                break
            self.checkpoints.remove(victim)
            self.stats.evictions += 1
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.nbytes() + extra)
