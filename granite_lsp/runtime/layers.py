"""The three kinds of sub-blocks of a GraniteMoeHybrid decoder layer, batch size 1.

Plain classes holding tensors rather than ``nn.Module``s: there is no training, hooks or
autograd here, and a decode step calls ~100 of these, so skipping module dispatch is free
speed. Activations are [T, features] (no batch dim). Semantics follow transformers'
``modeling_granitemoehybrid`` (its eager/torch path); in float32 the results agree with it to
~1e-5 and with a float64 evaluation to ~5e-5 on the real shape (tests/test_runtime.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import ATTENTION_MAX_HEAD_DIM, GEMV_MAX_ROWS, MAMBA_MAX_HEAD_DIM, CpuKernels, PackedLinear
from . import cuda_kernels
from .config import HybridConfig
from .matmul import big_op_threads, linear, matmul_threads
from .ssm import ssm_chunked, ssm_recurrent

# Up to this many new tokens, attention on the CPU kernels runs row by row through the decode kernel
# (each row over the positions up to its own) instead of torch's SDPA: speculative decoding's verify
# (1 + k rows) then costs about k more decode attentions, where SDPA with a causal mask took ~8 ms a
# layer for 2 rows at depth 512 (2 busy cores; a decode step's attention is a fraction of a ms), and
# each row's result is the one a plain decode step gives.
DECODE_ATTENTION_ROWS = GEMV_MAX_ROWS  # the one-call step's rows: a verify's rows keep a step's bits

# A weight matrix as the layers hold it: a tensor, or packed for the CPU kernels.
Matrix = Tensor | PackedLinear


def _fused(x: Tensor, *others: Tensor) -> bool:
    """Whether the fused CPU kernels take this input: contiguous fp32 CPU tensors (whether there
    are kernels at all was decided when the model was built: the ``kernels`` arguments)."""
    return x.device.type == "cpu" and all(t.dtype == torch.float32 and t.is_contiguous() for t in (x, *others))


def add_rms_norm(
    x: Tensor, h: Tensor, alpha: float, weight: Tensor, eps: float, kernels: CpuKernels | None
) -> tuple[Tensor, Tensor]:
    """The residual update ``x + alpha * h`` and its RMSNorm (fused in place on CPU fp32)."""
    if kernels is not None and _fused(x, h, weight):
        return x, kernels.add_rms_norm(x, h, alpha, weight, eps, matmul_threads())
    x = torch.add(x, h, alpha=alpha)
    return x, rms_norm(x, weight, eps, kernels)


def rms_norm(x: Tensor, weight: Tensor, eps: float, kernels: CpuKernels | None) -> Tensor:
    """HF's RMSNorm: normalise in float32, cast back, then scale (in the model dtype).

    In float32 torch's fused kernel gave bit-identical results in our checks, in one op not eight;
    for bf16 it would round differently from HF (scale before the cast), so spell it out."""
    if x.dtype == torch.float32:
        if kernels is not None and _fused(x, weight):
            return kernels.rms_norm(x, weight, eps, matmul_threads())
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class MLP:
    """Dense SwiGLU ("shared_mlp"): gate and up share one fused input matrix [2I, D]."""

    def __init__(self, input_linear: Matrix, output_linear: Matrix, kernels: CpuKernels | None) -> None:
        self.w_in = input_linear
        self.w_out = output_linear
        self.inner = output_linear.shape[1]
        self.kernels = kernels

    def forward(self, h: Tensor) -> Tensor:
        gu = linear(h, self.w_in)
        if self.kernels is not None and _fused(gu):
            return linear(self.kernels.swiglu(gu, matmul_threads()), self.w_out)
        gate, up = gu[:, : self.inner], gu[:, self.inner :]
        return linear(F.silu(gate) * up, self.w_out)


class Attention:
    """Causal GQA self-attention appending into a preallocated KV buffer; no RoPE ("nope")
    unless the config asks for it."""

    def __init__(
        self,
        cfg: HybridConfig,
        wqkv: Matrix,
        bqkv: Tensor | None,
        wo: Matrix,
        bo: Tensor | None,
        kernels: CpuKernels | None,
    ) -> None:
        self.n_q = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.hd = cfg.head_dim
        self.scale = cfg.attention_multiplier
        self.wqkv, self.bqkv, self.wo, self.bo = wqkv, bqkv, wo, bo
        self.kernels = kernels
        # Through CpuKernels.attention_decode (up to DECODE_ATTENTION_ROWS rows) and attention_prefill
        # (more) when there are kernels (False: torch ops).
        self.fused = kernels is not None

    def forward(
        self,
        h: Tensor,
        kbuf: Tensor,
        vbuf: Tensor,
        pos: int,
        rope: tuple[Tensor, Tensor] | None,
        out_rows: slice | None = None,
    ) -> Tensor:
        """``out_rows``: project only these rows' outputs (all rows still enter the KV cache)."""
        qkv = linear(h, self.wqkv, self.bqkv)
        return linear(self.attend(qkv, kbuf, vbuf, pos, rope, out_rows), self.wo, self.bo)

    def attend(
        self,
        qkv: Tensor,
        kbuf: Tensor,
        vbuf: Tensor,
        pos: int,
        rope: tuple[Tensor, Tensor] | None,
        out_rows: slice | None = None,
    ) -> Tensor:
        """Everything between the two projections: the new K/V into the buffers, attention over them.
        Apart so that a batched decode step (runtime/rows.py) projects several sequences' rows at once
        and attends each over its own KV buffers."""
        T = qkv.shape[0]
        nq, nkv, hd = self.n_q, self.n_kv, self.hd
        q = qkv[:, : nq * hd].view(T, nq, hd).transpose(0, 1)
        k = qkv[:, nq * hd : (nq + nkv) * hd].view(T, nkv, hd).transpose(0, 1)
        v = qkv[:, (nq + nkv) * hd :].view(T, nkv, hd).transpose(0, 1)
        if rope is not None:
            q, k = _apply_rope(q, rope), _apply_rope(k, rope)
        end = pos + T
        kbuf[:, pos:end] = k
        vbuf[:, pos:end] = v
        if (
            T <= DECODE_ATTENTION_ROWS
            and self.fused
            and self.kernels is not None
            and rope is None
            and _fused(qkv, kbuf, vbuf)
        ):
            # each row sees the positions up to its own: causal, and the same result as decoding it alone
            rows = range(T) if out_rows is None else range(T)[out_rows]
            outs: list[Tensor] = [
                self.kernels.attention_decode(qkv[i, : nq * hd], kbuf, vbuf, pos + i + 1, self.scale, matmul_threads())
                for i in rows
            ]
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        if (
            self.fused
            and self.kernels is not None
            and rope is None
            and hd % 8 == 0
            and hd <= ATTENTION_MAX_HEAD_DIM
            and _fused(qkv, kbuf, vbuf)
        ):
            # prefill: causal attention in one kernel (attention.cpp) instead of SDPA with a mask
            out = self.kernels.attention_prefill(qkv, kbuf, vbuf, pos, nq, self.scale, matmul_threads())
            return out if out_rows is None else out[out_rows].contiguous()
        keys, values = kbuf[:, :end], vbuf[:, :end]
        if T == 1:
            out = _decode_attention(q, keys, values, self.scale)
        else:
            mask = None
            if pos > 0:
                # query i sits at absolute position pos + i and may see keys 0..pos+i
                qpos = torch.arange(pos, end, device=qkv.device).unsqueeze(1)
                mask = torch.arange(end, device=qkv.device).unsqueeze(0) <= qpos
            with big_op_threads():  # 7% of a 2k-token prefill on one thread
                out = F.scaled_dot_product_attention(
                    q.unsqueeze(0),
                    keys.unsqueeze(0),
                    values.unsqueeze(0),
                    attn_mask=mask,
                    is_causal=pos == 0,
                    scale=self.scale,
                    enable_gqa=nq != nkv,
                )[0]
        out = out.transpose(0, 1).reshape(T, nq * hd)
        if out_rows is not None:
            out = out[out_rows].contiguous()
        return out


def _decode_attention(q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """One query token: fold the query heads of each KV group into rows so GQA needs no
    repeat of K/V and no mask; q [nq, 1, hd], keys/values [nkv, L, hd] -> [nq, 1, hd]."""
    nq, _, hd = q.shape
    nkv = keys.shape[0]
    qg = q.reshape(nkv, nq // nkv, hd)
    scores = torch.matmul(qg, keys.transpose(1, 2)).mul_(scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values).view(nq, 1, hd)


def _apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    cos, sin = rope  # [T, hd]
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rope_tables(cfg: HybridConfig, pos: int, T: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin [T, head_dim] for positions pos..pos+T-1 (default RoPE, computed like HF)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    freqs = torch.arange(pos, pos + T, device=device).float().unsqueeze(1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class MambaMixer:
    """Mamba2 mixer: in_proj -> causal depthwise conv + SiLU -> selective scan -> gated
    group RMSNorm -> out_proj, continuing from (and updating) a conv and an SSM state."""

    def __init__(
        self,
        cfg: HybridConfig,
        in_proj: Matrix,
        in_bias: Tensor | None,
        conv_weight: Tensor,
        conv_bias: Tensor | None,
        dt_bias: Tensor,
        A_log: Tensor,
        D: Tensor,
        norm_weight: Tensor,
        out_proj: Matrix,
        out_bias: Tensor | None,
        kernels: CpuKernels | None,
    ) -> None:
        self.inner = cfg.mamba_intermediate
        self.H = cfg.mamba_n_heads
        self.P = cfg.mamba_d_head
        self.G = cfg.mamba_n_groups
        self.N = cfg.mamba_d_state
        self.K = cfg.mamba_d_conv
        self.conv_dim = cfg.mamba_conv_dim
        self.eps = cfg.rms_norm_eps
        self.dt_min, self.dt_max = cfg.time_step_min, cfg.time_step_max
        self.w_in, self.b_in = in_proj, in_bias
        # Conv taps as [K, C] float32: the conv runs as K shifted multiply-adds over [T, C]
        # rows, which needs no transposes and is exact for any T >= 1.
        self.conv_w = conv_weight.reshape(self.conv_dim, self.K).t().float().contiguous()
        self.conv_b = conv_bias.float() if conv_bias is not None else None
        # SSM parameters live in float32 whatever the model dtype (A is precomputed once).
        self.dt_bias = dt_bias.float()
        self.A = -torch.exp(A_log.float())
        self.D = D.float()
        self.norm_w = norm_weight
        self.norm_w32 = norm_weight.float()
        self.w_out, self.b_out = out_proj, out_bias
        # Through the fused CPU kernel (CpuKernels.mamba_mixer) when there are kernels; False forces
        # the torch ops below (tests compare the two).
        self.kernels = kernels
        self.fused = kernels is not None and self.P <= MAMBA_MAX_HEAD_DIM
        # On CUDA, the conv and the scan through causal_conv1d / mamba_ssm when installed
        # (cuda_kernels.py); False forces the torch ops there too. The chunk length of that scan.
        self.cuda_kernels = True
        self.cuda_chunk_size = cuda_kernels.SCAN_CHUNK_SIZE

    def forward(
        self,
        h: Tensor,
        conv_state: Tensor,
        ssm_state: Tensor,
        chunk_size: int,
        recurrent_max: int,
        out_rows: slice | None = None,
        record: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """``out_rows``: project only these rows' outputs; the states still advance over all rows.
        ``record`` (a journaled forward: state.py) is called between the first row and the others,
        with the others' in_proj rows: the states it sees are those after the first row."""
        zxbcdt = linear(h, self.w_in, self.b_in)
        if record is not None and zxbcdt.shape[0] > 1:
            # the same recurrence as one call over all rows, one token after another
            first = self.mix(zxbcdt[:1], conv_state, ssm_state, chunk_size, recurrent_max)
            record(zxbcdt[1:])
            rest = self.mix(zxbcdt[1:], conv_state, ssm_state, chunk_size, recurrent_max)
            y = torch.cat((first, rest))
            return linear(y if out_rows is None else y[out_rows], self.w_out, self.b_out)
        y = self.mix(zxbcdt, conv_state, ssm_state, chunk_size, recurrent_max, out_rows)
        return linear(y, self.w_out, self.b_out)

    def mix(
        self,
        zxbcdt: Tensor,
        conv_state: Tensor,
        ssm_state: Tensor,
        chunk_size: int,
        recurrent_max: int,
        out_rows: slice | None = None,
    ) -> Tensor:
        """Between the projections: advance the states over the in_proj rows ``zxbcdt`` and return
        what out_proj takes (of ``out_rows`` only, when given). Speculative decoding's rollback calls
        it alone to re-run the recurrence over the rows it keeps (ModelState.keep). A batched decode step
        (runtime/rows.py) calls it per sequence, each with its own states, between projections of all rows."""
        T = zxbcdt.shape[0]
        E, C, H, P, G, N = self.inner, self.conv_dim, self.H, self.P, self.G, self.N
        if self.fused and self.kernels is not None and _fused(zxbcdt, conv_state, ssm_state):
            y1: Tensor = self.kernels.mamba_mixer(
                zxbcdt, conv_state, self.conv_w, self.conv_b, self.dt_bias, self.A, self.D, ssm_state,
                self.norm_w32, G, self.eps, self.dt_min, self.dt_max, matmul_threads(),
            )  # fmt: skip
            return y1 if out_rows is None else y1[out_rows]
        z = zxbcdt[:, :E]
        # CUDA kernels when installed (same layouts, same float32 math, same final states); each
        # answers None when it cannot run here and the torch ops below take over.
        gpu = self.cuda_kernels and zxbcdt.is_cuda
        xbc = cuda_kernels.conv(zxbcdt[:, E : E + C], conv_state, self.conv_w.t(), self.conv_b) if gpu else None
        if xbc is None:
            xbc = self._conv(zxbcdt[:, E : E + C], conv_state)  # [T, C] float32
        dt = F.softplus(zxbcdt[:, E + C :].float() + self.dt_bias)
        if self.dt_min > 0.0 or self.dt_max != float("inf"):
            dt = dt.clamp(self.dt_min, self.dt_max)
        x = xbc[:, :E].view(T, H, P)
        B = xbc[:, E : E + G * N].view(T, G, N)
        Cm = xbc[:, E + G * N :].view(T, G, N)
        y = cuda_kernels.scan(x, dt, self.A, B, Cm, ssm_state, self.cuda_chunk_size) if gpu else None
        if y is None:
            if T <= recurrent_max:
                y = ssm_recurrent(x, dt, self.A, B, Cm, ssm_state)
            else:
                y = ssm_chunked(x, dt, self.A, B, Cm, ssm_state, chunk_size)
        y = y.addcmul_(x, self.D.view(H, 1)).reshape(T, E)
        if out_rows is not None:
            y, z = y[out_rows], z[out_rows]
        return self._gated_norm(y, z).to(zxbcdt.dtype)

    def replay_conv(self, zxbcdt: Tensor, conv_state: Tensor) -> None:
        """Advance ``conv_state`` alone over the in_proj rows ``zxbcdt``: it keeps the last K-1 raw
        conv inputs, so this is a copy (a rollback that defers the scan: ModelState.keep)."""
        xbc = zxbcdt[:, self.inner : self.inner + self.conv_dim]
        conv_state.copy_(torch.cat((conv_state, xbc.to(conv_state.dtype)))[-conv_state.shape[0] :])

    def _conv(self, xbc: Tensor, conv_state: Tensor) -> Tensor:
        """Causal depthwise conv over [state; new inputs], then SiLU; updates ``conv_state``
        to the last K-1 raw inputs (which may partly be old state when T < K-1)."""
        T, K = xbc.shape[0], self.K
        padded = torch.cat((conv_state, xbc)).float()  # [K-1+T, C]
        conv_state.copy_(padded[T:])
        out = padded[0:T] * self.conv_w[0]
        if self.conv_b is not None:
            out.add_(self.conv_b)
        for k in range(1, K):
            out.addcmul_(padded[k : k + T], self.conv_w[k])
        return F.silu(out, inplace=True)

    def _gated_norm(self, y: Tensor, z: Tensor) -> Tensor:
        """HF's RMSNormGated with norm_before_gate=False: gate with silu(z), then RMS-normalise
        within groups of I // G channels, scale by the weight."""
        T = y.shape[0]
        y = y.mul_(F.silu(z.float()))  # y is float32 and ours to overwrite
        if self.G == 1:
            # float32 product like HF's chunked path; the caller casts to the model dtype
            return F.rms_norm(y, (self.inner,), self.norm_w32, self.eps)
        yg = F.rms_norm(y.view(T, self.G, self.inner // self.G), (self.inner // self.G,), None, self.eps)
        return self.norm_w32 * yg.view(T, self.inner)


@dataclass
class Block:
    """One decoder layer: input norm, mixer (Mamba or attention), post norm, MLP."""

    kind: str  # "mamba" | "attention"
    slot: int  # index into the state's Mamba buffers or KV layers
    ln_in: Tensor
    ln_post: Tensor
    mixer: MambaMixer | Attention
    mlp: MLP
