"""Explicit, restorable inference state: attention KV buffers plus Mamba conv/SSM states.

The server checkpoints the recurrent state so that an edit re-processes only the tokens after
the last checkpoint before it. Mamba layers have a fixed-size state that cannot be "rewound",
so it is copied out (``MambaSnapshot``); attention KV is append-only, so rewinding it is just
cropping its length. A ``ModelState`` owns one of each plus the position they correspond to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def _nbytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class KVCache:
    """Per attention layer K/V buffers [n_kv_heads, capacity, head_dim]; the first ``length`` valid.

    Preallocated so that decoding writes one column in place instead of concatenating (which
    would copy the whole cache every token); grows by doubling when a forward needs more room.
    """

    def __init__(self, k: list[Tensor], v: list[Tensor], length: int = 0) -> None:
        if len(k) != len(v):
            raise ValueError("k and v must have one buffer per attention layer each")
        self.k = k
        self.v = v
        self.length = length
        if length > self.capacity:
            raise ValueError(f"length {length} exceeds capacity {self.capacity}")

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
        """Forget every position >= n (the data stays and is overwritten by later appends)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a KV cache of length {self.length} to {n}")
        self.length = n

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions, growing geometrically so appends stay amortised O(1)."""
        cap = self.capacity
        if n <= cap:
            return
        new_cap = max(n, 2 * cap)
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = old.new_zeros(old.shape[0], new_cap, old.shape[2])
                new[:, : self.length] = old[:, : self.length]
                bufs[i] = new

    def clone(self, n: int | None = None, capacity: int | None = None) -> KVCache:
        """An independent cache holding this one's first ``n`` positions (default: all of them).

        ``capacity`` defaults to this cache's capacity so a branch can keep decoding without
        an immediate regrow; pass a smaller one to keep a long-lived copy compact.
        """
        n = self.length if n is None else n
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot clone {n} positions from a KV cache of length {self.length}")
        cap = max(n, 1, self.capacity if capacity is None else capacity)
        k, v = [], []
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


class ModelState:
    """Everything a forward pass continues from: KV cache, live Mamba buffers and ``pos``.

    ``ModelState(kv, mamba)`` pairs a KV cache with a snapshot: the snapshot is copied into
    fresh buffers (snapshots stay valid values, forward never mutates them), while ``kv`` is
    used in place (clone it first if something else still needs its contents beyond
    ``mamba.pos``). The cache is cropped to ``mamba.pos``.
    """

    def __init__(self, kv: KVCache, mamba: MambaSnapshot) -> None:
        if kv.length < mamba.pos:
            raise ValueError(f"KV cache holds {kv.length} positions, snapshot was taken at {mamba.pos}")
        kv.crop(mamba.pos)
        self.kv = kv
        # contiguous copies (a snapshot may hold broadcast views: Model.zero_snapshot)
        self.conv: list[Tensor] = [t.clone(memory_format=torch.contiguous_format) for t in mamba.conv]
        self.ssm: list[Tensor] = [t.clone(memory_format=torch.contiguous_format) for t in mamba.ssm]
        self.pos = mamba.pos

    def snapshot(self) -> MambaSnapshot:
        """Copy of the Mamba states at the current position (the KV needs no copy, see restore)."""
        return MambaSnapshot(tuple(t.clone() for t in self.conv), tuple(t.clone() for t in self.ssm), self.pos)

    def restore(self, snap: MambaSnapshot) -> None:
        """Rewind to ``snap``: copy its Mamba states back and crop the KV cache to its position.

        Only valid if the KV cache still holds the same tokens up to ``snap.pos`` (i.e. the
        snapshot was taken on this state's history); that is the caller's bookkeeping.
        """
        if len(snap.conv) != len(self.conv) or len(snap.ssm) != len(self.ssm):
            raise ValueError("snapshot belongs to a model with a different number of Mamba layers")
        if snap.pos > self.kv.length:
            raise ValueError(f"snapshot at {snap.pos} is beyond the {self.kv.length} cached positions")
        pairs = list(zip(self.conv + self.ssm, snap.conv + snap.ssm, strict=True))
        for dst, src in pairs:  # validate everything before overwriting anything
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(
                    f"snapshot tensor {tuple(src.shape)} {src.dtype} != state {tuple(dst.shape)} {dst.dtype}"
                )
        with torch.inference_mode(self.is_inference):
            for dst, src in pairs:
                dst.copy_(src)
        self.kv.crop(snap.pos)
        self.pos = snap.pos

    def fork(self, snap: MambaSnapshot | None = None) -> ModelState:
        """An independent state (shares no buffer) at the current position, or at ``snap``."""
        snap = self.snapshot() if snap is None else snap
        if snap.pos > self.kv.length:
            raise ValueError(f"snapshot at {snap.pos} is beyond the {self.kv.length} cached positions")
        return ModelState(self.kv.clone(snap.pos), snap)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + _nbytes(self.conv) + _nbytes(self.ssm)

    @property
    def is_inference(self) -> bool:
        """Whether the buffers were created under ``torch.inference_mode`` (by a caller): such
        tensors can only be updated in place inside inference mode, so we enter it for them."""
        return any(bufs[0].is_inference() for bufs in (self.conv, self.ssm, self.kv.k) if bufs)
