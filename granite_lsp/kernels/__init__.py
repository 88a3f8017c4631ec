"""Fast ``x @ W^T`` on CPU: streaming kernels for decoding, a blocked GEMM for prefill.

Decoding one token reads every weight once, so its speed is set by how close the matmuls get to
memory bandwidth. torch's kernels for a single row of x reach a fraction of it on AVX2 machines
(and its OpenMP regions stall when a core is busy), so ``linear.cpp`` streams fp32, bf16 or
fp16 or int8 (per-row scale) weights with AVX2 FMA on a small thread pool of its own. Prefill is
compute-bound instead: ``linear.cpp`` also has a blocked GEMM that widens W while packing it (MKL
needs fp32 copies of bf16/fp16/int8 weights first). ``mamba.cpp``, ``attention.cpp`` and
``norms.cpp`` fuse the rest of a layer (Mamba2 mixer for any number of tokens, decode attention,
norms, SwiGLU); ``step.cpp`` runs every layer of a decode step in one call (the same kernels,
without ~300 Python-to-C++ calls a token); ``common.h`` holds the thread pool and vector helpers,
``ops.cpp`` the op table. It is compiled on first use (``torch.utils.cpp_extension``: needs a C++
compiler and ninja) into a cache directory; when it cannot be built or the CPU lacks AVX2/FMA,
``PackedLinear`` computes the same thing with torch ops, just slower.

Modules: ``build`` (compiling, caching and loading the library), ``lock`` (the build's lock),
``ops`` (``load()``, the one decision whether the kernels are here, and ``CpuKernels``, their
typed interface), ``packed`` (``PackedLinear``). README.md here: adding a kernel, the environment
knobs, which benchmark to run.
"""

from .ops import (
    ATTENTION_MAX_HEAD_DIM,
    GEMV_MAX_ROWS,
    MAMBA_MAX_EXPORT_STATE,
    MAMBA_MAX_HEAD_DIM,
    CpuKernels,
    KernelsRequired,
    available,
    build_error,
    load,
    read_probe,
)
from .packed import PackedLinear

__all__ = [
    "ATTENTION_MAX_HEAD_DIM",
    "GEMV_MAX_ROWS",
    "MAMBA_MAX_EXPORT_STATE",
    "MAMBA_MAX_HEAD_DIM",
    "CpuKernels",
    "KernelsRequired",
    "PackedLinear",
    "available",
    "build_error",
    "load",
    "read_probe",
]
