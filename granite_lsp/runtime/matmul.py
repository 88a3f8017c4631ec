"""How the runtime runs its matmuls (and threads); every weight product goes through ``linear``.

With the CPU kernels (the default), weights are ``kernels.PackedLinear`` and their products run in
the extension, for decode and prefill alike. What follows is about plain tensor weights: the
fallback without the extension (and GPUs, which take ``F.linear``). Two measured effects on the
2-core AMD EPYC (Zen 3, AVX2, no native bf16) this was tuned on,
with torch 2.13's MKL / oneDNN:

* Kernel choice by row count. ``F.linear`` (x @ W^T) is fine for one row but MKL handles a
  handful of rows badly: 2 rows cost 2.2x one row, 4 rows 3x, although the weights streamed are
  the same. Computing the transposed product (W @ x^T) instead runs the same work as a
  "many rows, few columns" GEMM: 1.4x / 1.75x faster at 2 / 4 rows, 1.3x at 32; past ~100 rows
  copying its transposed result back costs more than it saves. bf16 has no native AVX2 path:
  oneDNN's bf16 GEMM is ~10% faster than fp32 for one row but linear in T (5.5x slower than fp32
  at 64 rows), so beyond a few rows the bf16 weight is widened to fp32 for the product (output
  rounded back to bf16).

* Threads. A decode step is ~130 weight-streaming matmuls plus ~2000 small ops, a prefill adds
  big elementwise and scan ops. torch opens an OpenMP parallel region for every op above ~32k
  elements, and when the machine is busy (an editor, a build) the second thread is often
  descheduled and every region waits for it: on 2 busy cores such ops went from ~45 us to
  2-8 ms, tripling a decode step, and a 512-token prefill took 22-37 s instead of 8-10 s. The
  matmuls cope (MKL's threading degrades gracefully), so by default everything except them
  runs on one thread and ``linear`` alone uses the caller's thread count; switching costs
  ~0.2 us. Thread counts are process-global in torch: this assumes one thread drives the
  model at a time, as the server does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import PackedLinear

# From this many rows on, a bf16 weight is widened to fp32 for the product (measured: 4 rows
# 241 ms bf16 vs 302 widened for all layers; 8 rows 442 vs 355).
BF16_WIDEN_MIN_ROWS = 6
# Largest weight slice (elements) widened to fp32 at once: 16 MB, covers every layer but lm_head.
WIDEN_BLOCK = 1 << 22

# Up to this many rows the transposed product wins even counting the copy back to row-major
# (7 layers: 32 rows 132 vs 175 ms, 128 rows 342 vs 360, 512 rows 1299 vs 1102: the transposing
# copy grows to 20% of the product).
TRANSPOSED_MAX_ROWS = 64

# > 1 while inside ``small_ops_single_threaded``: the count to restore around matmuls.
_matmul_threads = 0


@contextmanager
def small_ops_single_threaded() -> Iterator[None]:
    """Run enclosed ops on one thread, except ``linear`` which keeps the caller's count."""
    global _matmul_threads
    n = torch.get_num_threads()
    if n == 1 or _matmul_threads:
        yield
        return
    torch.set_num_threads(1)
    _matmul_threads = n
    try:
        yield
    finally:
        _matmul_threads = 0
        torch.set_num_threads(n)


@contextmanager
def big_op_threads() -> Iterator[None]:
    """Inside ``small_ops_single_threaded``, give one big torch op (prefill attention: one OpenMP
    region of tens of ms, where a late thread costs little) the matmul thread count."""
    n = _matmul_threads
    if n <= 1:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def _product(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    rows = x.shape[0]
    if x.dim() != 2 or not x.is_cpu:  # the choices below are CPU measurements; a GPU takes F.linear
        return F.linear(x, w, b)
    if w.dtype == torch.bfloat16 and rows >= BF16_WIDEN_MIN_ROWS:
        return _widened_product(x, w, b)
    if rows == 1 or rows > TRANSPOSED_MAX_ROWS:
        return F.linear(x, w, b)
    out = torch.mm(w, x.t()) if b is None else torch.addmm(b.unsqueeze(1), w, x.t())
    return out.t().contiguous()


def _widened_product(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """bf16 product through fp32, widening at most ``WIDEN_BLOCK`` weight elements at a time
    (the tied lm_head alone would otherwise need a 300 MB fp32 temporary)."""
    xf = x.float()
    rows_per_block = max(1, WIDEN_BLOCK // w.shape[1])
    if w.shape[0] <= rows_per_block:
        return _product(xf, w.float(), None if b is None else b.float()).to(x.dtype)
    out = x.new_empty(x.shape[0], w.shape[0])
    for i in range(0, w.shape[0], rows_per_block):
        j = min(i + rows_per_block, w.shape[0])
        out[:, i:j] = _product(xf, w[i:j].float(), None if b is None else b[i:j].float())
    return out


def matmul_threads() -> int:
    """The thread count matmuls (and our fused kernels) may use right now."""
    return _matmul_threads or torch.get_num_threads()


def linear(x: Tensor, w: Tensor | PackedLinear, b: Tensor | None = None) -> Tensor:
    """x [T, in] @ w[out, in]^T (+ b) with the fastest kernel for T, on the caller's threads.

    ``w`` may be a ``PackedLinear`` (CPU kernels, its bias inside; float32 in and out)."""
    n = _matmul_threads
    if isinstance(w, PackedLinear):
        if b is not None:
            raise ValueError("a PackedLinear carries its own bias")
        if n <= 1:
            return w(x)
        if w.runs_in_kernel(x):
            return w(x, threads=n)
        torch.set_num_threads(n)  # for its torch fallback (the extension is missing)
        try:
            return w(x, threads=n)
        finally:
            torch.set_num_threads(1)
    if n <= 1:
        return _product(x, w, b)
    torch.set_num_threads(n)
    try:
        return _product(x, w, b)
    finally:
        torch.set_num_threads(1)
