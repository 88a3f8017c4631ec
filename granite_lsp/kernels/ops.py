"""The kernels as Python sees them: ``load()`` decides once per process whether they are here, and
``CpuKernels`` is their typed interface (one method per op in ops.cpp).

The model asks ``load()`` once, when it is built, and hands the answer (a ``CpuKernels`` or None)
to its layers and matrices: the call sites hold the decision instead of re-making it per call.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, cast

import torch
from torch import Tensor

from . import build

log = logging.getLogger(__name__)

# Up to this many rows of x the streaming kernels run (each row's result bit-identical alone or in
# a batch), above it the blocked GEMM, which wins from ~16-24 rows (bf16 768x3376: 8 rows 0.78 vs
# 1.19 ms, 24 rows 2.45 vs 2.29, 64 rows 7.29 vs 4.76). On the model's 512-row shapes it ran at
# 0.8-1.3x MKL's fp32 sgemm (noisy machine) and 1.1-2.3x MKL on widened bf16/fp16/int8 copies.
# Also the most rows of a one-call step (a decode step, a verify: step.cpp) and of the Mamba
# recurrence. Defined once, in ops.h (kMaxStreamRows), and read from there.
GEMV_MAX_ROWS = build.header_constant("ops.h", "kMaxStreamRows")
# Largest Mamba head dim CpuKernels.mamba_mixer takes (mamba.cpp's per-head scratch), read from there.
MAMBA_MAX_HEAD_DIM = build.header_constant("mamba.cpp", "kMaxHeadDim")
# Largest Mamba head state (P * N floats) whose rows a one-call verify exports (mamba.cpp's copy of it on
# a task's stack), read from there: a model with larger heads verifies layer by layer.
MAMBA_MAX_EXPORT_STATE = build.header_constant("mamba.cpp", "kLocalStateFloats")
# Largest attention head dim CpuKernels.attention_prefill takes, read from attention.cpp.
ATTENTION_MAX_HEAD_DIM = build.header_constant("attention.cpp", "kMaxPrefillHeadDim")


class CpuKernels:
    """The compiled ops; every method takes ``threads`` (the kernels' own pool, not torch's)."""

    def __init__(self, ops: Any) -> None:
        self._ops = ops

    def linear(self, x: Tensor, w: Tensor, scale: Tensor | None, bias: Tensor | None, threads: int) -> Tensor:
        """``x @ w^T (+ bias)`` for x [T, K] fp32: streaming kernels up to GEMV_MAX_ROWS rows, the
        blocked GEMM above."""
        op = self._ops.linear if x.shape[0] <= GEMV_MAX_ROWS else self._ops.gemm
        return cast(Tensor, op(x, w, scale, bias, threads))

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, threads: int) -> Tensor:
        """RMSNorm(x) * weight over the last dim (fp32, contiguous)."""
        return cast(Tensor, self._ops.rms_norm(x, weight, eps, threads))

    def add_rms_norm(self, x: Tensor, h: Tensor, alpha: float, weight: Tensor, eps: float, threads: int) -> Tensor:
        """``x += alpha * h`` in place, then RMSNorm(x) * weight (fp32)."""
        return cast(Tensor, self._ops.add_rms_norm(x, h, alpha, weight, eps, threads))

    def swiglu(self, gu: Tensor, threads: int) -> Tensor:
        """silu(gate) * up of ``gu`` = [gate | up] (fp32 rows)."""
        return cast(Tensor, self._ops.swiglu(gu, threads))

    def attention_decode(self, q: Tensor, k: Tensor, v: Tensor, length: int, scale: float, threads: int) -> Tensor:
        """Attention of one token's query heads ``q`` [nq * hd] over the first ``length`` positions
        of the KV buffers [nkv, capacity, hd] (fp32, GQA groups of nq / nkv heads); [1, nq * hd]."""
        return cast(Tensor, self._ops.attention_decode(q, k, v, length, scale, threads))

    def attention_prefill(
        self, qkv: Tensor, k: Tensor, v: Tensor, pos: int, n_heads: int, scale: float, threads: int
    ) -> Tensor:
        """Causal attention of T new tokens (prefill): the ``n_heads`` query heads at the start of each
        row of ``qkv`` [T, >= n_heads * hd], row i at position ``pos + i``, over the KV buffers
        [nkv, capacity, hd] that already hold positions 0 .. pos + T - 1 (fp32, GQA); [T, n_heads * hd].
        Head dims that are multiples of 8 up to ATTENTION_MAX_HEAD_DIM."""
        return cast(Tensor, self._ops.attention_prefill(qkv, k, v, pos, n_heads, scale, threads))

    def mamba_mixer(
        self,
        zxbcdt: Tensor,
        conv_state: Tensor,
        conv_w: Tensor,
        conv_b: Tensor | None,
        dt_bias: Tensor,
        A: Tensor,
        D: Tensor,
        ssm_state: Tensor,
        norm_w: Tensor,
        n_groups: int,
        eps: float,
        dt_min: float,
        dt_max: float,
        threads: int,
    ) -> Tensor:
        """A Mamba2 mixer between in_proj and out_proj (conv, selective scan, gated norm) for T >= 1
        tokens, fused; updates ``conv_state`` and ``ssm_state`` in place (the torch ops doing the
        same: runtime/layers.py)."""
        return cast(Tensor, self._ops.mamba_mixer(
            zxbcdt, conv_state, conv_w, conv_b, dt_bias, A, D, ssm_state, norm_w,
            n_groups, eps, dt_min, dt_max, threads,
        ))  # fmt: skip

    def decode_layers(
        self,
        x: Tensor,
        weights: list[Tensor | None],
        ints: list[int],
        floats: list[float],
        conv: list[Tensor],
        ssm: list[Tensor],
        k: list[Tensor],
        v: list[Tensor],
        pos: list[int],
        threads: int,
        deferred: list[Tensor] | None = None,
        journal: tuple[list[Tensor], list[Tensor]] | None = None,
    ) -> list[Tensor]:
        """Every decoder layer of up to GEMV_MAX_ROWS rows in one call: consecutive tokens of one
        sequence from ``pos[0]`` (a decode step, a verify's rows), or one token for each of several
        sequences at ``pos[i]`` (runtime/rows.py), their states and KV buffers listed layer by layer,
        sequence by sequence (step.cpp documents that and the layout of ``weights``, ``ints`` and
        ``floats``). Updates ``x``, the states and the KV buffers in place. ``deferred`` (one sequence):
        per Mamba layer, scan rows [n, E + G N + H] its SSM state has yet to advance over, applied first.
        ``journal`` (one sequence, >= 2 rows; runtime/state.py's Journal): per Mamba layer, a buffer for the conv state
        after the first row and one for the other rows' scan inputs [T - 1, E + G N + H], which the SSM state then
        does not advance over (it does over the first). Returns [the residual stream after the last layer], followed
        in a journaled call by each Mamba layer's in_proj rows after the first."""
        conv_saved, exported = journal or ([], [])
        return cast(list[Tensor], self._ops.decode_layers(
            x, weights, ints, floats, conv, ssm, k, v, pos, threads, deferred or [], conv_saved, exported,
        ))  # fmt: skip

    def mamba_advance(self, ssm_state: Tensor, rows: Tensor, n_groups: int, threads: int) -> None:
        """Advance ``ssm_state`` [H, P, N] over scan rows [n, E + G N + H] (what a journaled
        ``decode_layers`` exports), bit for bit as that call would have (ModelState.settle)."""
        self._ops.mamba_advance(ssm_state, rows, n_groups, threads)

    def isa_level(self) -> str:
        """The instruction-set level the kernels run at (isa.h; isa.py reads and sets it)."""
        return cast(str, self._ops.isa_level())

    def isa_levels(self) -> list[str]:
        """The levels this CPU supports, lowest first."""
        return list(self._ops.isa_levels())

    def set_isa_level(self, name: str) -> str:
        """Runs the kernels at ``name`` (one of isa_levels()) from now on; returns the previous level."""
        return cast(str, self._ops.set_isa_level(name))

    def isa_note(self) -> str:
        """Why GRANITE_LSP_ISA was not applied ('' when it was or is unset)."""
        return cast(str, self._ops.isa_note())

    def read_probe(self, buf: Tensor, threads: int) -> float:
        """Streams ``buf`` (size a multiple of 256 KB) on the kernels' threads: the read-bandwidth ceiling."""
        return cast(float, self._ops.read_probe(buf, threads))


class KernelsRequired(RuntimeError):
    """GRANITE_LSP_REQUIRE_KERNELS=1 and the kernels could not be loaded."""


_lock = threading.Lock()
_state: dict[str, Any] = {}  # "kernels" -> CpuKernels or None, "error" -> str or None


def load(progress: build.Progress | None = None) -> CpuKernels | None:
    """The kernels (built on the first call of the first process: ~30-60 s), or None with the reason
    in ``build_error()``; decided once per process. ``progress`` hears about a compile.

    ``GRANITE_LSP_KERNELS=0`` disables them; ``GRANITE_LSP_REQUIRE_KERNELS=1`` (CI) makes their
    absence an error (``KernelsRequired``) instead of a slower fallback, unless disabled."""
    if "kernels" in _state:  # decided already: no lock
        return cast("CpuKernels | None", _state["kernels"])
    with _lock:
        if "kernels" not in _state:
            _state.update(_decide(progress))
    if _state["kernels"] is None and _required():
        raise KernelsRequired(f"GRANITE_LSP_REQUIRE_KERNELS=1 but the CPU kernels are unavailable: {_state['error']}")
    return cast("CpuKernels | None", _state["kernels"])


def _required() -> bool:
    return os.environ.get("GRANITE_LSP_REQUIRE_KERNELS") == "1" and os.environ.get("GRANITE_LSP_KERNELS") != "0"


def _decide(progress: build.Progress | None) -> dict[str, Any]:
    if os.environ.get("GRANITE_LSP_KERNELS", "1") == "0":
        return {"kernels": None, "error": "disabled by GRANITE_LSP_KERNELS=0"}
    if not build.cpu_supported():
        return {"kernels": None, "error": "CPU without AVX2/FMA/F16C (or not x86-64 Linux or macOS)"}
    ops, error = build.load_library(progress, retry_failed=_required())
    if ops is None:
        log.warning("CPU kernels unavailable, using torch ops: %s", error)
        return {"kernels": None, "error": error}
    return {"kernels": CpuKernels(ops), "error": None}


def available() -> bool:
    """Whether the kernels are built and usable here (builds them on the first call)."""
    return load() is not None


def build_error() -> str | None:
    """Why the kernels are unavailable (None when they are available or not yet tried)."""
    return _state.get("error")


def read_probe(buf: Tensor, threads: int | None = None) -> float:
    """``CpuKernels.read_probe`` on torch's thread count by default; raises without the kernels."""
    kernels = load()
    if kernels is None:
        raise RuntimeError(f"kernels unavailable: {build_error()}")
    return kernels.read_probe(buf, threads or torch.get_num_threads())
