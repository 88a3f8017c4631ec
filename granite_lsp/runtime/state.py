"""Explicit, restorable inference state: attention KV buffers plus Mamba conv/SSM states.

The server checkpoints the recurrent state so that an edit re-processes only the tokens after
the last checkpoint before it. Mamba layers have a fixed-size state that cannot be "rewound",
so it is copied out (``MambaSnapshot``); attention KV is append-only, so rewinding it is just
moving its end. A ``ModelState`` owns one of each plus the position they correspond to.

The KV cache keeps its own invariants: only ``advance`` (after a forward wrote the new positions),
``rewind_to`` and ``crop`` move its end, and a position that someone ``hold``s for later (a
checkpoint) is never overwritten: ``ModelState.prepare`` branches the cache (copies the positions
in use to fresh buffers) before a write that would. So several checkpoints of one token history
share one buffer, and a branch costs a copy only when it is written.

A forward can also be *undoable* (``ModelState.journal_next``): the state then keeps what it needs to
take it back, to any of its rows (speculative decoding's verify: ``ModelState.keep``) or whole (a piece
of background work stopped between two layers: ``ModelState.undo``). One mechanism for both: ``Journal``.
A verify's rollback may leave rows *deferred*: the live SSM states not yet advanced over the rows kept,
which the next forward applies on its way (``ModelState.deferred`` says why and who settles them).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..kernels import GEMV_MAX_ROWS
from .matmul import small_ops_single_threaded


def _nbytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class KVHold:
    """A promise that positions [0, pos) of ``kv`` stay as they are (a checkpoint will rewind to
    them). Dropping the last reference releases it: nothing to forget to call."""

    __slots__ = ("__weakref__", "kv", "pos")

    def __init__(self, kv: KVCache, pos: int) -> None:
        self.kv = kv
        self.pos = pos


class KVCache:
    """Per attention layer K/V buffers [n_kv_heads, capacity, head_dim]; the first ``length`` valid.

    Preallocated so that decoding writes one column in place instead of concatenating (which
    would copy the whole cache every token); grows by doubling when a forward needs more room.
    Positions up to ``intact`` hold the data of this history (``rewind_to`` may go back up to it);
    a write after ``length`` makes ``length`` the new ``intact``.
    """

    def __init__(self, k: list[Tensor], v: list[Tensor], length: int = 0) -> None:
        if len(k) != len(v):
            raise ValueError("k and v must have one buffer per attention layer each")
        self.k = k
        self.v = v
        if length > self.capacity:
            raise ValueError(f"length {length} exceeds capacity {self.capacity}")
        self._length = length
        self._intact = length
        self._holds: weakref.WeakSet[KVHold] = weakref.WeakSet()

    @property
    def length(self) -> int:
        """Positions in use (what the next forward continues from)."""
        return self._length

    @property
    def intact(self) -> int:
        """Positions whose data is still this history's (>= length)."""
        return self._intact

    @classmethod
    def empty(
        cls,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (n_kv_heads, max(1, capacity), head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        return cls(k, v, 0)

    @property
    def capacity(self) -> int:
        # A model without attention layers has no buffers; it can hold any length.
        return self.k[0].shape[1] if self.k else 1 << 62

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not length: that is what the process actually holds)."""
        return _nbytes(self.k) + _nbytes(self.v)

    def crop(self, n: int) -> None:
        """Forget every position >= n for good (the data stays and is overwritten by later appends)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a KV cache of length {self.length} to {n}")
        self._length = self._intact = n

    def rewind_to(self, n: int) -> None:
        """Continue from position ``n``: back, or forward again up to ``intact`` (positions that a
        rewind left behind hold their data until the next write)."""
        if not 0 <= n <= self._intact:
            raise ValueError(f"cannot rewind a KV cache holding {self._intact} intact positions to {n}")
        self._length = n

    def advance(self, n: int) -> None:
        """A forward wrote positions [length, length + n): they are in use, later ones are stale."""
        if n < 0 or self._length + n > self.capacity:
            raise ValueError(f"cannot advance a KV cache of length {self.length} by {n} (capacity {self.capacity})")
        self._length += n
        self._intact = self._length

    def hold(self, n: int | None = None) -> KVHold:
        """Keep positions [0, n) (default: ``length``) as they are while the result is referenced."""
        n = self._length if n is None else n
        if not 0 <= n <= self._intact:
            raise ValueError(f"cannot hold {n} positions of a KV cache holding {self._intact} intact ones")
        hold = KVHold(self, n)
        self._holds.add(hold)
        return hold

    def writable(self) -> bool:
        """Whether writing after ``length`` overwrites no held position."""
        return all(h.pos <= self._length for h in self._holds)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions, growing geometrically so appends stay amortised O(1)."""
        cap = self.capacity
        if n <= cap:
            return
        new_cap = max(n, 2 * cap)
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = old.new_zeros(old.shape[0], new_cap, old.shape[2])
                new[:, : self._length] = old[:, : self._length]
                bufs[i] = new
        self._intact = self._length  # what a rewind left behind was not copied

    def clone(self, n: int | None = None, capacity: int | None = None) -> KVCache:
        """An independent cache holding this one's first ``n`` positions (default: all of them).

        ``capacity`` defaults to this cache's capacity so a branch can keep decoding without
        an immediate regrow; pass a smaller one to keep a long-lived copy compact.
        """
        n = self.length if n is None else n
        if not 0 <= n <= self._intact:
            raise ValueError(f"cannot clone {n} positions from a KV cache holding {self._intact} intact ones")
        cap = max(n, 1, self.capacity if capacity is None else capacity)
        k: list[Tensor] = []
        v: list[Tensor] = []
        for src, dst in ((self.k, k), (self.v, v)):
            for old in src:
                new = old.new_zeros(old.shape[0], cap, old.shape[2])
                new[:, :n] = old[:, :n]
                dst.append(new)
        return KVCache(k, v, n)


@dataclass(frozen=True)
class MambaSnapshot:
    """Copies of every Mamba layer's conv state [d_conv-1, conv_dim] (model dtype) and SSM state
    [n_heads, d_head, d_state] (float32), taken after ``pos`` tokens. Treated as immutable."""

    conv: tuple[Tensor, ...]
    ssm: tuple[Tensor, ...]
    pos: int

    @property
    def nbytes(self) -> int:
        return _nbytes(self.conv) + _nbytes(self.ssm)

    def clone(self) -> MambaSnapshot:
        return MambaSnapshot(tuple(t.clone() for t in self.conv), tuple(t.clone() for t in self.ssm), self.pos)


class Journal:
    """What an undoable forward leaves so that the state can keep only its first rows, or none of them.

    Whole (``journal_next(whole=True)``): a forward that may be taken back entirely, also when it stops
    between two layers (state_cache.py's pieces of background work: a request waits), when the first
    layers' states have advanced over tokens the others have not seen. The Mamba states *before* it are
    copied into the journal's buffers when it begins (a piece's few percent: bench/piece_cost.py), and
    ``undo`` swaps them back in (nothing copied) and rewinds the KV.

    By rows (the default): speculative decoding verifies k draft tokens in one forward and keeps the
    first j + 1 rows (the token it had to feed plus the j drafts the model agreed with). Attention KV
    just crops. A Mamba state cannot be rewound, and writing each row's SSM state (~22 MB per token on
    the real shape) would cost more than the whole forward saves. The first row (the token decoding had
    to feed anyway) is always kept. Per Mamba layer, in buffers kept from one verify to the next
    (allocating 22 MB per step cost page faults), the journal keeps the conv state *after the first row*
    and the other rows' inputs (the layer's in_proj output rows: [T - 1, E + C + H] fp32, ~13 KB a row on
    the real shape), and, by the path the forward took:
    - the one-call step (kernels/step.cpp, ``one_call``, ``deferring``): no SSM state at all. The kernel
      applies the deferred rows the live SSM states had and the verify's first row (in place, as a plain
      step would), runs the other rows on a copy of each head's state that it drops, and leaves their
      scan inputs (x dt, B, decay) in ``ModelState.spare_rows``. ``keep(n)`` makes the first n - 1 of
      them the deferred rows (``ModelState.deferred``: nothing copied, nothing re-run; the next forward
      applies them on its way; none when every draft was rejected) and, for n < T, rebuilds the conv
      state after the n rows from the inputs (a copy of raw rows). A verify then reads and writes the
      SSM states as a plain step does: a journal that wrote the states after the first row to buffers of
      their own (the path below) wrote 22 MB more per verify on the real shape, ~+6% of an int8 step, and
      one that wrote the states after every row to another buffer the same;
    - layer by layer (``record``, the reference, and the path of every forward the one-call step does
      not take): the SSM state *after the first row* (the mixer runs the first row, the states are
      copied, then the other rows). Keeping n < T rows swaps the copies back in and re-runs the layer's
      conv and scan over the n - 1 drafts kept (``replay``: no matmul, the same kernel and arithmetic
      as the forward).
    Either way the state after ``keep(n)`` is bit for bit the one n plain steps leave
    (tests/test_runtime.py, test_speculate.py). bench/verify_cost.py measures a verify, its rollback
    and the step after it against plain steps.
    Whether a forward is journaled at all is the caller's: one whose rows all stay (the engine's trail
    tokens and the one after them, no drafts) is not (``StateCache.feed``).
    """

    def __init__(self) -> None:
        self.start = -1  # the state's position when the journaled forward began; -1: none pending
        self.rows = 0
        self.whole = False  # taken back whole (the states before it kept) rather than by rows
        self.deferring = False  # by rows, through the one-call step: its rows' scan inputs, no SSM states
        # per Mamba slot, kept from one journaled forward to the next: the states before the forward
        # (whole), or after its first row (by rows: the SSM ones only layer by layer)
        self.conv: dict[int, Tensor] = {}
        self.ssm: dict[int, Tensor] = {}
        self.inputs: dict[int, Tensor] = {}  # per Mamba slot: the forward's in_proj rows after the first

    @property
    def active(self) -> bool:
        return self.start >= 0

    @property
    def records(self) -> bool:
        """Whether the running forward records its rows (journaled by rows: ``ModelState.record``)."""
        return self.active and not self.whole

    def clear(self) -> None:
        self.start, self.rows, self.whole, self.deferring = -1, 0, False, False
        self.inputs.clear()


class Recurrence(Protocol):
    """What taking a journaled forward back to some of its rows needs from the model (HybridModel's
    layers know the rows' layout and run the kernels), per Mamba layer ``slot``."""

    def replay(self, slot: int, inputs: Tensor, conv: Tensor, ssm: Tensor) -> None:
        """Re-run the layer's conv and scan over in_proj rows ``inputs``, from and into the given states."""

    def replay_conv(self, slot: int, inputs: Tensor, conv: Tensor) -> None:
        """Advance the conv state alone over in_proj rows ``inputs`` (the last raw rows: a copy)."""

    def advance(self, slot: int, rows: Tensor, ssm: Tensor) -> None:
        """Advance the SSM state over scan rows [n, E + G N + H], as the forward that left them would have."""

    @property
    def scan_row_width(self) -> int:
        """Floats in a scan row (E + G N + H)."""


class ModelState:
    """Everything a forward pass continues from: KV cache, live Mamba buffers and ``pos``.

    ``ModelState(kv, mamba)`` pairs a KV cache with a snapshot: the snapshot is copied into
    fresh buffers (snapshots stay valid values, forward never mutates them), while ``kv`` is
    used in place, rewound to ``mamba.pos`` (positions of it that something ``hold``s are not
    overwritten: see ``prepare``); it must hold at least that many.

    Consistent only between two forwards: a forward advances the layers one after another, in place, so
    a forward that stops midway (an exception, ``model.Interrupted``) leaves the first layers' Mamba
    states past tokens the others have not seen, which is the state of no token list. Restoring a
    snapshot taken before that forward makes it consistent again: the Mamba states are copied back and
    the KV rewound to the snapshot's position (what the forward wrote past it is overwritten later).
    A forward journaled whole (``journal_next(whole=True)``) can be taken back without a snapshot:
    ``undo`` swaps the journal's copies of the states from its start back in. state_cache.StateCache
    journals each piece of background work that can stop between layers that way (StateCache._piece).

    Deferred rows: after a verify through the one-call step keeps n of its rows (``keep``), the live SSM states are
    those after its first row, and the first ``deferred`` (n - 1) rows of each ``scan_rows`` buffer are the rows
    they have yet to advance over (the conv states, the KV and ``pos`` are current). Writing the states after them
    would cost a pass over ~22 MB (real shape) per verify; deferred, the next one-call forward applies them while it
    holds each head's state anyway (kernels/step.cpp: at most GEMV_MAX_ROWS rows, each one more pass of arithmetic
    over a head's state in cache, ~0.3% of an int8 step on the real shape), and whatever else reads or copies the
    live states settles them first (``settle``: ``snapshot``, ``fork``, a forward the one-call step does not take,
    runtime/rows.py's candidates). The invariant: each Mamba layer's live SSM state advanced over its deferred rows
    is the state at ``pos``; while a one-call verify's journal is open, over the verify's other rows in
    ``spare_rows``.
    """

    def __init__(self, kv: KVCache, mamba: MambaSnapshot) -> None:
        if kv.length < mamba.pos:
            raise ValueError(f"KV cache holds {kv.length} positions, snapshot was taken at {mamba.pos}")
        kv.rewind_to(mamba.pos)
        self.kv = kv
        # contiguous copies (a snapshot may hold broadcast views: Model.zero_snapshot)
        self.conv: list[Tensor] = [t.clone(memory_format=torch.contiguous_format) for t in mamba.conv]
        self.ssm: list[Tensor] = [t.clone(memory_format=torch.contiguous_format) for t in mamba.ssm]
        self.pos = mamba.pos
        self.journal = Journal()
        self._journal_next: bool | None = None  # the next forward's journal: whole (True), by rows, none
        # per Mamba slot [GEMV_MAX_ROWS, E + G N + H], allocated by the first one-call verify: the deferred
        # rows, and the buffers a verify leaves its rows in (the two swap when its rows are kept)
        self.scan_rows: list[Tensor] = []
        self.spare_rows: list[Tensor] = []
        self.deferred = 0
        self._recurrence: Recurrence | None = None  # what applies deferred rows (the model that left them)

    def snapshot(self) -> MambaSnapshot:
        """Copy of the Mamba states at the current position (the KV needs no copy, see restore). Settles
        deferred rows first (and a one-call verify not taken back keeps all its rows: ``settle``)."""
        self.settle()
        return MambaSnapshot(tuple(t.clone() for t in self.conv), tuple(t.clone() for t in self.ssm), self.pos)

    def settle(self) -> None:
        """Make the live buffers hold the states at ``pos`` themselves, for whatever reads or copies them
        other than a one-call forward: a verify through the one-call step that nobody took back keeps all
        its rows (as the journal of a layer-by-layer one would), and deferred rows are applied (one pass
        over the states: the same kernel arithmetic as the forward that would have, so the same bits)."""
        self._close_deferring_journal()
        if not self.deferred:
            return
        assert self._recurrence is not None
        with torch.no_grad(), torch.inference_mode(self.is_inference):
            for slot, rows in enumerate(self.scan_rows):
                self._recurrence.advance(slot, rows[: self.deferred], self.ssm[slot])
        self.deferred = 0

    def _close_deferring_journal(self) -> None:
        """A one-call verify's journal still open (nobody called ``keep``): all its rows stay."""
        j = self.journal
        if j.deferring and j.active:
            self._defer_verified(j.rows)
            j.clear()

    def _defer_verified(self, n: int) -> None:
        """The first ``n`` rows of the one-call verify just run stay: those after its first (which the kernel
        applied, with the deferred rows before it) become the deferred rows."""
        self.scan_rows, self.spare_rows = self.spare_rows, self.scan_rows
        self.deferred = n - 1

    def restore(self, snap: MambaSnapshot, hold: KVHold | None = None) -> None:
        """Rewind to ``snap``: copy its Mamba states back and continue from its position, on this
        state's KV cache (back from its current length) or on the one ``hold`` keeps (up to the
        held positions, which no write has touched: a checkpoint keeps a hold beside its snapshot).

        Only valid if that cache holds the same tokens up to ``snap.pos`` (i.e. the snapshot was
        taken on its history); that is the caller's bookkeeping.
        """
        kv = self.kv if hold is None else hold.kv
        limit = self.kv.length if hold is None else min(hold.pos, kv.intact)
        if len(snap.conv) != len(self.conv) or len(snap.ssm) != len(self.ssm):
            raise ValueError("snapshot belongs to a model with a different number of Mamba layers")
        if snap.pos > limit:
            raise ValueError(f"snapshot at {snap.pos} is beyond the {limit} cached positions")
        pairs = list(zip(self.conv + self.ssm, snap.conv + snap.ssm, strict=True))
        for dst, src in pairs:  # validate everything before overwriting anything
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(
                    f"snapshot tensor {tuple(src.shape)} {src.dtype} != state {tuple(dst.shape)} {dst.dtype}"
                )
        with torch.inference_mode(self.is_inference):
            for dst, src in pairs:
                dst.copy_(src)
        kv.rewind_to(snap.pos)
        self.kv = kv
        self.pos = snap.pos
        self.journal.clear()
        self._journal_next = None
        self.deferred = 0

    # -- undoable forwards (speculative decoding, pieces of background work; see Journal) --------
    def journal_next(self, whole: bool = False) -> None:
        """Journal the next forward, so that ``keep`` can go back to any of its rows from the first, or
        (``whole``) so that ``undo`` can take it back entirely, even if it stops midway."""
        self._journal_next = whole

    def begin_forward(self, n: int) -> bool:
        """A forward of ``n`` tokens starts (after ``prepare``); whether it records its rows (journaled by
        rows). Any older journal is dropped: ``keep`` and ``undo`` only ever apply to the last forward."""
        self._close_deferring_journal()
        j = self.journal
        j.clear()
        whole, self._journal_next = self._journal_next, None
        if whole is None:
            return False
        j.start, j.rows, j.whole = self.pos, n, whole
        if whole:
            self.settle()  # undo swaps the states back in: they must be the states at the start
            pairs = [self._journal_slot(slot) for slot in range(len(self.conv))]
            # memory-bound copies, on one thread (see StateCache._restore)
            with small_ops_single_threaded(), torch.inference_mode(self.is_inference):
                for slot, (conv, ssm) in enumerate(pairs):
                    conv.copy_(self.conv[slot])
                    ssm.copy_(self.ssm[slot])
        return j.records

    def undo(self) -> None:
        """Take back the last forward, journaled ``whole``, also one that stopped midway (an exception,
        ``Interrupted``): the Mamba states before it are swapped back in (nothing is copied) and the KV
        continues from its start again (what it wrote there is overwritten later). A forward longer than
        the model's ``prefill_piece`` runs in several pieces (HybridModel._forward_pieces), each advancing
        ``pos``: stopped in a later one it is anywhere from its start to its end, and the swap and crop
        are right at any of those (the journal holds the states at its start; the KV up to it is intact)."""
        j = self.journal
        if not j.whole or not j.start <= self.pos <= j.start + j.rows:
            raise ValueError("undo() follows a forward journaled whole, before anything else moves the state")
        for slot in range(len(self.conv)):
            self.conv[slot], j.conv[slot] = j.conv[slot], self.conv[slot]
            self.ssm[slot], j.ssm[slot] = j.ssm[slot], self.ssm[slot]
        self.kv.crop(j.start)
        self.pos = j.start
        j.clear()

    def record(self, slot: int, inputs: Tensor) -> None:
        """A journaled forward's Mamba layer ``slot`` has advanced its states over the first row and is
        about to advance them over ``inputs`` (the other rows)."""
        conv, ssm = self._journal_slot(slot)
        with torch.inference_mode(self.is_inference):
            conv.copy_(self.conv[slot])
            ssm.copy_(self.ssm[slot])
        self.journal.inputs[slot] = inputs

    def one_call(
        self, rows: int, recurrence: Recurrence
    ) -> tuple[list[Tensor], tuple[list[Tensor], list[Tensor]] | None]:
        """What a one-call forward of ``rows`` tokens (kernels/step.cpp) takes beside the live states: each
        Mamba layer's deferred rows (applied first; none: []), and for a forward journaled by rows, the
        journal: buffers for the conv states after the first row and for the other rows' scan inputs (which
        ``recurrence``, the model's, applies if they are settled later). Call ``one_call_done`` after it."""
        deferred = [r[: self.deferred] for r in self.scan_rows] if self.deferred else []
        j = self.journal
        if not (j.records and rows > 1):
            return deferred, None
        n = len(self.conv)
        if not n:  # no Mamba layer: nothing to journal but the KV (keep crops it)
            return deferred, ([], [])
        if len(j.conv) != n:  # once allocated they keep their shapes (see restore)
            for slot in range(n):
                self._journal_buffer(self.conv, j.conv, slot)
        if j.start != self.pos:
            raise ValueError("no journaled forward is running on this state")
        width = recurrence.scan_row_width
        if len(self.spare_rows) != n or self.spare_rows[0].shape[1] != width:
            with torch.inference_mode(self.is_inference):
                self.scan_rows = [self.ssm[0].new_empty(GEMV_MAX_ROWS, width) for _ in range(n)]
                self.spare_rows = [self.ssm[0].new_empty(GEMV_MAX_ROWS, width) for _ in range(n)]
            deferred = []
            assert not self.deferred, "deferred rows come from a verify, which allocated the buffers"
        self._recurrence = recurrence
        return deferred, ([j.conv[slot] for slot in range(n)], [r[: rows - 1] for r in self.spare_rows])

    def one_call_done(self, inputs: Sequence[Tensor] | None) -> None:
        """The one-call forward returned: it applied the deferred rows to the live states in place, and unjournaled,
        its own rows too; journaled (``inputs``: each Mamba layer's in_proj rows after the first, in slot
        order), its first row, leaving the others' scan inputs for ``keep``. (A forward that raised does not
        get here: its state is restored, and until then nothing takes its half-written rows for rows.)"""
        self.deferred = 0
        if inputs is None:
            return
        if len(inputs) != len(self.conv):
            raise ValueError(f"{len(inputs)} journaled inputs for {len(self.conv)} Mamba layers")
        for slot, rows in enumerate(inputs):
            self.journal.inputs[slot] = rows
        self.journal.deferring = bool(inputs)

    def _journal_slot(self, slot: int) -> tuple[Tensor, Tensor]:
        """Mamba slot ``slot``'s journal buffers for its conv and SSM states (``_journal_buffer``)."""
        return self._journal_buffer(self.conv, self.journal.conv, slot), self._journal_buffer(
            self.ssm, self.journal.ssm, slot
        )

    def _journal_buffer(self, live: list[Tensor], saved: dict[int, Tensor], slot: int) -> Tensor:
        """The journal's buffer in ``saved`` for the live state ``live[slot]``, allocated on the first
        journaled forward that needs it and kept (the one-call verify needs only the conv ones)."""
        j = self.journal
        if not j.active or j.start != self.pos:
            raise ValueError("no journaled forward is running on this state")
        buf = saved.get(slot)
        if buf is None or buf.shape != live[slot].shape or buf.dtype != live[slot].dtype:
            with torch.inference_mode(self.is_inference):
                buf = saved[slot] = torch.empty_like(live[slot])
        return buf

    def keep(self, n: int, recurrence: Recurrence) -> None:
        """Keep the first ``n`` >= 1 rows of the last (journaled) forward: the state is then exactly as
        if only those tokens had been fed (with rows deferred, see the class docstring)."""
        j = self.journal
        if not j.records or self.pos != j.start + j.rows:
            raise ValueError("keep() follows a forward journaled by rows, before anything else moves the state")
        if not 1 <= n <= j.rows:
            raise ValueError(f"cannot keep {n} of a journaled forward's {j.rows} rows (the first is always kept)")
        with torch.no_grad(), torch.inference_mode(self.is_inference):
            if j.deferring:  # the live SSM states are those after the verify's first row: n - 1 rows wait
                self._defer_verified(n)
            if n < j.rows:
                for slot, inputs in j.inputs.items():
                    # the states after the first row become live again; the advanced ones are scratch
                    self.conv[slot], j.conv[slot] = j.conv[slot], self.conv[slot]
                    if j.deferring:
                        if n > 1:
                            recurrence.replay_conv(slot, inputs[: n - 1], self.conv[slot])
                        continue
                    self.ssm[slot], j.ssm[slot] = j.ssm[slot], self.ssm[slot]
                    if n > 1:
                        recurrence.replay(slot, inputs[: n - 1], self.conv[slot], self.ssm[slot])
                self.kv.crop(j.start + n)
                self.pos = j.start + n
        j.clear()

    def prepare(self, n: int) -> None:
        """Before a forward writes ``n`` positions: branch the KV cache if a holder still needs
        positions it would overwrite (copy-on-write), and make room."""
        if not self.kv.writable():
            self.kv = self.kv.clone(self.pos)
        self.kv.crop(self.pos)  # what lies beyond is overwritten from here on, even if the forward fails
        self.kv.reserve(self.pos + n)

    def advance(self, n: int) -> None:
        """A forward consumed ``n`` tokens (and wrote their KV positions)."""
        if self.kv.length != self.pos:
            raise ValueError(f"state is inconsistent: pos {self.pos} but KV length {self.kv.length}")
        self.kv.advance(n)
        self.pos += n

    def fork(self, snap: MambaSnapshot | None = None) -> ModelState:
        """An independent state (shares no buffer) at the current position, or at ``snap``."""
        snap = self.snapshot() if snap is None else snap
        if snap.pos > self.kv.length:
            raise ValueError(f"snapshot at {snap.pos} is beyond the {self.kv.length} cached positions")
        return ModelState(self.kv.clone(snap.pos), snap)

    @property
    def nbytes(self) -> int:
        journal = _nbytes([*self.journal.conv.values(), *self.journal.ssm.values(), *self.scan_rows, *self.spare_rows])
        return self.kv.nbytes + _nbytes(self.conv) + _nbytes(self.ssm) + journal

    @property
    def is_inference(self) -> bool:
        """Whether the buffers were created under ``torch.inference_mode`` (by a caller): such
        tensors can only be updated in place inside inference mode, so we enter it for them."""
        return any(bufs[0].is_inference() for bufs in (self.conv, self.ssm, self.kv.k) if bufs)
