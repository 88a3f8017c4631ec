"""``PackedLinear``: a weight matrix prepared once at load time for ``x @ W^T`` on CPU.

fp32, bf16, fp16 or int8 with a per-row scale. It runs on the kernels it is given (``ops.load()``
by default), and computes the same product with torch ops when given none.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import CpuKernels, load

# Rows of W upcast at a time by the torch fallback for bf16/int8 (~4 MB of fp32).
_FALLBACK_BLOCK_BYTES = 4 << 20


class PackedLinear:
    """``y = x @ W^T (+ b)`` with W prepared once at load time: fp32, bf16, fp16, or int8 with a per-row scale.

    Up to GEMV_MAX_ROWS rows of x go through the streaming kernels (decode, small edits), where each
    output element is summed in the same order whatever T is: a row gets the bit-identical result
    alone or in a small batch. Longer inputs (prefill) go through the extension's blocked GEMM.
    Without the extension (``kernels`` None), torch computes the same product (MKL, widening a
    block at a time).
    """

    def __init__(self, weight: Tensor, scale: Tensor | None, bias: Tensor | None, kernels: CpuKernels | None) -> None:
        self.weight = weight  # [N, K] float32, bfloat16, float16 or int8 (then scale: [N] float32)
        self.scale = scale
        self.bias = bias
        self.kernels = kernels
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        mode: str = "same",
        kernels: CpuKernels | None | Literal["load"] = "load",
    ) -> PackedLinear:
        """Prepares ``weight`` [N, K]. mode "same" keeps fp32 / bf16 / fp16 (no copy when already
        contiguous); "int8" quantizes symmetrically per output row (scale = max|row| / 127).
        ``kernels``: what computes the product ("load": ``ops.load()``; None: torch ops)."""
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
        return cls(weight.contiguous(), scale, bias, load() if kernels == "load" else kernels)

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
        return self.kernels is not None

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
        if self.kernels is None:
            return self._torch(x)
        return self.kernels.linear(x, self.weight, self.scale, self.bias, threads)

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
