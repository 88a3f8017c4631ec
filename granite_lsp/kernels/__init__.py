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

Knobs (environment): ``GRANITE_LSP_KERNELS=0`` disables the extension;
``GRANITE_LSP_KERNEL_CACHE`` overrides the build directory's parent.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PackedLinear",
    "available",
    "build_error",
    "add_rms_norm",
    "attention_decode",
    "decode_layers",
    "mamba_mixer",
    "read_probe",
    "rms_norm",
    "swiglu",
]

log = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = [_DIR / name for name in ("ops.cpp", "linear.cpp", "mamba.cpp", "attention.cpp", "norms.cpp", "step.cpp")]
_HEADERS = [_DIR / name for name in ("common.h", "ops.h")]
# No -march=native: the cached binary must run on any AVX2 machine that shares the cache.
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++20"]
# Up to this many rows of x the streaming kernels run (each row's result bit-identical alone or in
# a batch), above it the blocked GEMM, which wins from ~16-24 rows (bf16 768x3376: 8 rows 0.78 vs
# 1.19 ms, 24 rows 2.45 vs 2.29, 64 rows 7.29 vs 4.76). On the model's 512-row shapes it ran at
# 0.8-1.3x MKL's fp32 sgemm (noisy machine) and 1.1-2.3x MKL on widened bf16/fp16/int8 copies.
GEMV_MAX_ROWS = 16
# Largest Mamba head dim kernels.mamba_mixer takes (mamba.cpp's per-head scratch, kMaxHeadDim).
MAMBA_MAX_HEAD_DIM = 256
# Rows of W upcast at a time by the torch fallback for bf16/int8 (~4 MB of fp32).
_FALLBACK_BLOCK_BYTES = 4 << 20

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" -> torch.ops namespace or None, "error" -> str


def _cpu_supported() -> bool:
    """True on x86-64 Linux when /proc/cpuinfo lists avx2, fma and f16c (what the binary is compiled for)."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"avx2", "fma", "f16c"} <= flags
    return False


def _build_dir() -> Path:
    """A directory per (source, flags, torch, python): a stale binary is never picked up."""
    root = os.environ.get("GRANITE_LSP_KERNEL_CACHE")
    if not root:
        root = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "granite-lsp", "kernels"
        )
    code = b"".join(f.name.encode() + f.read_bytes() for f in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(code + " ".join(_CFLAGS).encode()).hexdigest()[:12]
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    return Path(root) / tag.replace("+", "_")


def _ensure_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH, where the PyPI package's binary is only when the venv is activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI package
    except ImportError:
        return
    if ninja.BIN_DIR:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _load() -> object | None:
    """The compiled ops (building them on first call), or None with the reason in build_error()."""
    if "ops" in _state:  # decided already: no lock on the decode path (~150 calls per token)
        return _state["ops"]
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        ops, error = None, None
        if os.environ.get("GRANITE_LSP_KERNELS", "1") == "0":
            error = "disabled by GRANITE_LSP_KERNELS=0"
        elif not _cpu_supported():
            error = "CPU without AVX2/FMA/F16C (or not x86-64 Linux)"
        else:
            try:
                from torch.utils.cpp_extension import load

                _ensure_ninja_on_path()
                build_dir = _build_dir()
                build_dir.mkdir(parents=True, exist_ok=True)
                load(
                    name="granite_gemv",
                    sources=[str(f) for f in _SOURCES],
                    extra_cflags=_CFLAGS,
                    build_directory=str(build_dir),
                    is_python_module=False,  # registers torch.ops.granite_gemv; no pybind11 to compile
                    verbose=False,  # ninja's output is captured: stdout belongs to the LSP transport
                )
                ops = torch.ops.granite_gemv
            except Exception as e:  # no compiler, no ninja, read-only cache, ...: fall back to torch
                error = f"{type(e).__name__}: {e}"
        if error:
            log.warning("granite_lsp.kernels unavailable, using torch matmuls: %s", error)
        _state.update(ops=ops, error=error)
        return ops


def available() -> bool:
    """Whether the extension is built and usable here (builds it on the first call: ~30-60 s)."""
    return _load() is not None


def build_error() -> str | None:
    """Why the extension is unavailable (None when it is available or not yet tried)."""
    return _state.get("error")  # type: ignore[return-value]


def read_probe(buf: Tensor, threads: int | None = None) -> float:
    """Streams ``buf`` (size a multiple of 256 KB) on the kernels' threads: the read-bandwidth ceiling."""
    ops = _load()
    if ops is None:
        raise RuntimeError(f"kernels unavailable: {build_error()}")
    return ops.read_probe(buf, threads or torch.get_num_threads())


def rms_norm(x: Tensor, weight: Tensor, eps: float, threads: int | None = None) -> Tensor | None:
    """RMSNorm(x) * weight over the last dim (fp32, contiguous); None without the extension."""
    ops = _load()
    return None if ops is None else ops.rms_norm(x, weight, eps, threads or torch.get_num_threads())


def add_rms_norm(
    x: Tensor, h: Tensor, alpha: float, weight: Tensor, eps: float, threads: int | None = None
) -> Tensor | None:
    """``x += alpha * h`` in place, then RMSNorm(x) * weight (fp32); None without the extension."""
    ops = _load()
    return None if ops is None else ops.add_rms_norm(x, h, alpha, weight, eps, threads or torch.get_num_threads())


def swiglu(gu: Tensor, threads: int | None = None) -> Tensor | None:
    """silu(gate) * up of ``gu`` = [gate | up] (fp32 rows); None without the extension."""
    ops = _load()
    return None if ops is None else ops.swiglu(gu, threads or torch.get_num_threads())


def attention_decode(
    q: Tensor, k: Tensor, v: Tensor, length: int, scale: float, threads: int | None = None
) -> Tensor | None:
    """Attention of one token's query heads ``q`` [nq * hd] over the first ``length`` positions of
    the KV buffers [nkv, capacity, hd] (fp32, GQA groups of nq / nkv heads); [1, nq * hd], or None
    without the extension."""
    ops = _load()
    return None if ops is None else ops.attention_decode(q, k, v, length, scale, threads or torch.get_num_threads())


def mamba_mixer(
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
    threads: int | None = None,
) -> Tensor | None:
    """A Mamba2 mixer between in_proj and out_proj (conv, selective scan, gated norm) for T >= 1
    tokens, fused; updates ``conv_state`` and ``ssm_state`` in place. None when the extension is
    unavailable (the caller then runs the same computation in torch ops: runtime/layers.py)."""
    ops = _load()
    if ops is None:
        return None
    return ops.mamba_mixer(
        zxbcdt, conv_state, conv_w, conv_b, dt_bias, A, D, ssm_state, norm_w,
        n_groups, eps, dt_min, dt_max, threads or torch.get_num_threads(),
    )  # fmt: skip


def decode_layers(
    x: Tensor,
    weights: list[Tensor | None],
    ints: list[int],
    floats: list[float],
    conv: list[Tensor],
    ssm: list[Tensor],
    k: list[Tensor],
    v: list[Tensor],
    pos: int,
    threads: int | None = None,
) -> Tensor | None:
    """Every decoder layer of one decode step in one call (step.cpp documents the layout of
    ``weights``, ``ints`` and ``floats``); updates ``x``, the states and the KV buffers in place
    and returns the residual stream after the last layer. None without the extension."""
    ops = _load()
    if ops is None:
        return None
    return ops.decode_layers(x, weights, ints, floats, conv, ssm, k, v, pos, threads or torch.get_num_threads())


class PackedLinear:
    """``y = x @ W^T (+ b)`` with W prepared once at load time: fp32, bf16, fp16, or int8 with a per-row scale.

    Up to GEMV_MAX_ROWS rows of x go through the streaming kernels (decode, small edits), where each
    output element is summed in the same order whatever T is: a row gets the bit-identical result
    alone or in a small batch. Longer inputs (prefill) go through the extension's blocked GEMM.
    Without the extension, torch computes the same product (MKL, widening a block at a time).
    """

    def __init__(self, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> None:
        self.weight = weight  # [N, K] float32, bfloat16, float16 or int8 (then scale: [N] float32)
        self.scale = scale
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None, mode: str = "same") -> PackedLinear:
        """Prepares ``weight`` [N, K]. mode "same" keeps fp32 / bf16 / fp16 (no copy when already
        contiguous); "int8" quantizes symmetrically per output row (scale = max|row| / 127)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        weight = weight.detach()
        scale = None
        if mode == "int8":
            # A block of rows at a time (the fp32 temporaries of a whole lm_head would be ~1 GB),
            # in one fp32 buffer, in place: a fresh temporary per block and per op left the heap
            # fragmented, ~140 MB above the weights when a checkpoint finished loading.
            q = torch.empty(weight.shape, dtype=torch.int8)
            scale = torch.empty(weight.shape[0], dtype=torch.float32)
            step = max(1, _FALLBACK_BLOCK_BYTES // (4 * max(1, weight.shape[1])))
            buf = torch.empty(min(step, weight.shape[0]), weight.shape[1], dtype=torch.float32)
            for a in range(0, weight.shape[0], step):
                w = buf[: min(step, weight.shape[0] - a)]
                w.copy_(weight[a : a + step])  # never the caller's tensor
                s = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).div_(127)  # max |w| per row
                s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero rows stay zero
                q[a : a + step] = w.div_(s[:, None]).round_().clamp_(-127, 127)
                scale[a : a + step] = s
            weight = q
        elif mode == "same":
            if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"unsupported weight dtype {weight.dtype}")
        else:
            raise ValueError(f"mode must be 'same' or 'int8', got {mode!r}")
        if bias is not None:
            bias = bias.detach().float().contiguous()
        return cls(weight.contiguous(), scale, bias)

    @property
    def shape(self) -> torch.Size:
        """(out_features, in_features), like the weight tensor it replaces."""
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.bias) if t is not None)

    def dequantize(self, rows: Tensor | slice | None = None) -> Tensor:
        """The fp32 weight the layer computes with (or just ``rows`` of it: e.g. tied embeddings)."""
        w = self.weight if rows is None else self.weight[rows]
        w = w.float()
        if self.scale is not None:
            w = w * (self.scale if rows is None else self.scale[rows]).unsqueeze(-1)
        return w

    def runs_in_kernel(self, x: Tensor) -> bool:
        """Whether ``self(x)`` stays in the extension (no torch matmul, so no torch threads)."""
        return _load() is not None

    def __call__(self, x: Tensor, threads: int | None = None) -> Tensor:
        """``x`` [..., K] float32 (other float dtypes are cast) -> float32 [..., N].

        ``threads`` defaults to ``torch.get_num_threads()``; pass it explicitly when calling from
        code that lowers torch's count for its small ops.
        """
        lead = x.shape[:-1]
        x2 = x.reshape(math.prod(lead), self.in_features).to(torch.float32).contiguous()  # a view when 2-D fp32
        y = self.product(x2, threads or torch.get_num_threads())
        return y.reshape(*lead, self.out_features)

    def product(self, x: Tensor, threads: int) -> Tensor:
        """``x`` [T, K] contiguous float32 -> [T, N]: the streaming kernels for a few rows, the GEMM
        for more, torch without the extension."""
        ops = _load()
        if ops is None:
            return self._torch(x)
        op = ops.linear if x.shape[0] <= GEMV_MAX_ROWS else ops.gemm
        return op(x, self.weight, self.scale, self.bias, threads)

    def _torch(self, x: Tensor) -> Tensor:
        """The same product with torch ops: MKL for fp32, upcasting bf16/int8 a block of rows at a time."""
        if self.weight.dtype == torch.float32:
            return F.linear(x, self.weight, self.bias)
        step = max(1, _FALLBACK_BLOCK_BYTES // (4 * self.in_features))
        parts = [F.linear(x, self.dequantize(slice(a, a + step))) for a in range(0, self.out_features, step)]
        y = torch.cat(parts, dim=-1) if parts else x.new_zeros(x.shape[0], 0)
        return y if self.bias is None else y.add_(self.bias)

    def __repr__(self) -> str:
        kind = "int8" if self.scale is not None else str(self.weight.dtype).removeprefix("torch.")
        bias = ", bias" if self.bias is not None else ""
        return f"PackedLinear({self.in_features} -> {self.out_features}, {kind}{bias})"
