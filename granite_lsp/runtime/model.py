"""``HybridModel``: GraniteMoeHybrid (Mamba2 + attention) inference that continues from any state.

transformers' CPU path pads every call to its 256-token chunk and keeps state inside an opaque
cache; the completion server instead needs to process just the few tokens an edit changed,
starting from a checkpoint. So ``forward`` takes T >= 1 new tokens plus an explicit
``ModelState`` and advances it in place; small T runs the per-token recurrence, larger T the
chunked SSD scan, and logits are only computed where they are returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import failpoints
from ..kernels import GEMV_MAX_ROWS, MAMBA_MAX_EXPORT_STATE, CpuKernels, PackedLinear
from .config import HybridConfig
from .layers import Block, MambaMixer, add_rms_norm, rms_norm, rope_tables
from .matmul import linear, matmul_threads, small_ops_single_threaded
from .state import KVCache, MambaSnapshot, ModelState
from .weights import convert_state_dict, load_safetensors_dir, random_state_dict

# The torch path of the Mamba layers (no CPU extension; GPU without mamba_ssm): up to this many
# new tokens the token-by-token recurrence is used, above it the chunked scan. (With the
# extension, CpuKernels.mamba_mixer runs the recurrence for any T.) Whole-model continuation after
# 256 tokens, 1 thread, ms CPU (recurrent / scan): T=1 191/232,
# 2 236/285, 4 289/304, 8 401/394, 16 454/524, 32 728/605: equal within noise from 6 to 16.
DEFAULT_RECURRENT_MAX = 8
# Chunk length of the SSD scan (does not change results). Scan alone on the real shape, 1 thread,
# seconds for 28 layers at T=256/512/1024/2048: chunk 32: 0.31/0.59/1.39/2.34, 64: 0.28/0.58/
# 1.53/2.32, 128: 0.38/0.95/1.57/3.02, 256: 0.60/1.19/2.45/8.03 (64 balances the [L, L] decay
# work against the per-chunk [H, P, N] states: L^2 ~ P*N).
DEFAULT_CHUNK_SIZE = 64
# Longest input processed in one go; longer ones run in pieces (same result, bounded memory).
# A multiple of the scan chunk. A 1024-token bf16 prefill in pieces of 256 / 512 / 1024 / whole
# took 10.5 / 10.2 / 12.3 / 10.3 s (2 busy cores): no cost, and 512 bounds the transient
# activations to ~60 MB.
DEFAULT_PREFILL_PIECE = 512
# Run everything but the matmuls on one thread (see matmul.py). On 2 busy cores a 512-token
# prefill with 2 threads took 8.2-10.4 s this way against 22-37 s with torch's default threading
# of the elementwise/scan ops (1 thread throughout: ~6 s). Turn off only on an idle many-core box.
DEFAULT_SINGLE_THREAD_SMALL_OPS = True


class Interrupted(Exception):
    """A forward stopped between two layers because its ``interrupt`` said so (a request came while
    background work ran it). Like any exception out of a forward it leaves the state inconsistent: some
    layers have advanced over the new tokens and the others have not. The caller restores a snapshot
    taken before the forward, or journals the forward whole and undoes it (``ModelState.undo``:
    state_cache.StateCache does)."""


Interrupt = Callable[[int, int], bool]  # (layers done, layers) -> stop the forward here?


class HybridModel:
    """Batch-size-1 GraniteMoeHybrid forward over explicit state (see module docstring)."""

    def __init__(
        self,
        config: HybridConfig,
        embed: Tensor | None,
        blocks: list[Block],
        final_norm: Tensor,
        lm_head: Tensor | PackedLinear,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        recurrent_max: int = DEFAULT_RECURRENT_MAX,
        single_thread_small_ops: bool = DEFAULT_SINGLE_THREAD_SMALL_OPS,
        prefill_piece: int = DEFAULT_PREFILL_PIECE,
        cpu_kernels: CpuKernels | None = None,
    ) -> None:
        self.config = config
        self.kernels = cpu_kernels  # decided when the weights were converted (kernels.load())
        self.embed = embed
        self.blocks = blocks
        self.final_norm = final_norm
        self.lm_head = lm_head  # the embedding itself when tied (then ``embed`` may be None)
        self.chunk_size = chunk_size
        self.recurrent_max = recurrent_max
        self.single_thread_small_ops = single_thread_small_ops
        self.prefill_piece = prefill_piece
        # Forwards of up to 16 tokens (decode steps, verifies) through CpuKernels.decode_layers (every
        # layer in one call) where it applies; False forces the layer-by-layer path (tests compare them).
        self.fused_step = True
        self._mixers: dict[int, MambaMixer] | None = None
        self._step_plan: tuple[list[Tensor | None], list[int], list[float]] | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls,
        config: dict[str, Any] | str | Path | HybridConfig,
        state_dict: Mapping[str, Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        quantize: str | None = None,
        packed: bool | None = None,
        consume: bool = False,
        **kwargs: Any,
    ) -> HybridModel:
        """Build from tensors named like transformers' ``GraniteMoeHybridForCausalLM.state_dict()``
        (``weights.convert_state_dict`` documents the arguments); ``kwargs`` go to the constructor."""
        w = convert_state_dict(config, state_dict, dtype, device, quantize=quantize, packed=packed, consume=consume)
        return cls(w.config, w.embed, w.blocks, w.final_norm, w.lm_head, cpu_kernels=w.kernels, **kwargs)

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any] | str | Path | HybridConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
        **kwargs: Any,
    ) -> HybridModel:
        """Random weights of the configured shape (benchmarks: speed does not depend on values)."""
        cfg = HybridConfig.load(config)
        return cls.from_state_dict(cfg, random_state_dict(cfg, seed), dtype, device, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        **kwargs: Any,
    ) -> HybridModel:
        """Load a model directory (config.json + safetensors); never runs code from it."""
        root = Path(path)
        cfg = HybridConfig.load(root / "config.json")
        return cls.from_state_dict(cfg, load_safetensors_dir(root), dtype, device, consume=True, **kwargs)

    # -- properties ----------------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        """Whether the matrices are ``PackedLinear`` (CPU kernels; activations in float32)."""
        return isinstance(self.lm_head, PackedLinear)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV / conv state's) dtype."""
        return self.final_norm.dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        """How the matrices are stored: float32, bfloat16, float16 or int8."""
        return self.lm_head.weight.dtype if isinstance(self.lm_head, PackedLinear) else self.lm_head.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.device

    def weight_bytes(self) -> int:
        """Bytes of all weights (what a decode step streams, plus the embedding when untied)."""
        seen: set[int] = set()
        total = 0

        def add(t: object) -> None:
            nonlocal total
            if isinstance(t, PackedLinear):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.nbytes
            elif isinstance(t, Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()

        for obj in (self.embed, self.lm_head, self.final_norm, *self.blocks):
            if isinstance(obj, Block):
                for part in (obj.ln_in, obj.ln_post, *vars(obj.mixer).values(), *vars(obj.mlp).values()):
                    add(part)
            else:
                add(obj)
        return total

    def embed_rows(self, input_ids: Tensor) -> Tensor:
        """Embeddings of ``input_ids`` in the activation dtype (rows of the tied lm_head when packed)."""
        if self.embed is None:
            assert isinstance(self.lm_head, PackedLinear)  # tied and packed: see weights.py
            return self.lm_head.dequantize(input_ids).to(self.dtype)
        return F.embedding(input_ids, self.embed).to(self.dtype)

    # -- state -------------------------------------------------------------------------------
    def new_state(self, capacity: int = 1024) -> ModelState:
        """Zero state at position 0 with KV room for ``capacity`` tokens (grows if exceeded)."""
        cfg = self.config
        n_attn = len(cfg.attention_layers)
        kv = KVCache.empty(n_attn, cfg.num_key_value_heads, cfg.head_dim, capacity, self.dtype, self.device)
        return ModelState(kv, self.zero_snapshot())

    def zero_snapshot(self) -> MambaSnapshot:
        """The Mamba states at position 0, as broadcast views of one zero each: no memory (a
        real snapshot is ~22 MB on the real shape), and restoring or building a state from it
        copies zeros in."""
        cfg = self.config
        n_mamba = len(cfg.mamba_layers)
        conv_zero = torch.zeros((), dtype=self.dtype, device=self.device)
        ssm_zero = torch.zeros((), dtype=torch.float32, device=self.device)
        conv_shape = (cfg.mamba_d_conv - 1, cfg.mamba_conv_dim)
        ssm_shape = (cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state)
        conv = tuple(conv_zero.expand(conv_shape) for _ in range(n_mamba))
        return MambaSnapshot(conv, tuple(ssm_zero.expand(ssm_shape) for _ in range(n_mamba)), 0)

    # -- compute -------------------------------------------------------------------------------
    def forward(
        self, input_ids: Tensor, state: ModelState, all_logits: bool = False, interrupt: Interrupt | None = None
    ) -> Tensor:
        """Process T >= 1 new tokens after ``state`` (advanced in place by T).

        Returns float32 logits [vocab] of the last new position, or [T, vocab] if ``all_logits``.
        If this raises midway the state is inconsistent; restore a snapshot before reusing it.
        ``interrupt`` is asked between two layers (not before the first, nor inside a one-call forward:
        ``interruptible`` says which forwards can stop): True raises ``Interrupted`` there.
        """
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty 1-D tensor, got shape {tuple(input_ids.shape)}")
        T, pos = input_ids.shape[0], state.pos
        if state.kv.length != pos:
            raise ValueError(f"state is inconsistent: pos {pos} but KV length {state.kv.length}")
        # no_grad, not inference_mode: inference tensors (returned logits, KV buffers grown here)
        # could not be modified in place by callers outside inference mode, and the speed
        # difference was not measurable. A state a caller built in inference mode gets it.
        with torch.no_grad(), torch.inference_mode(state.is_inference):
            state.prepare(T)
            if state.begin_forward(T) and T > self.prefill_piece:
                raise ValueError(f"a journaled forward takes at most {self.prefill_piece} tokens, got {T}")
            if self.single_thread_small_ops:
                with small_ops_single_threaded():
                    return self._forward_pieces(input_ids, state, all_logits, interrupt)
            return self._forward_pieces(input_ids, state, all_logits, interrupt)

    __call__ = forward

    def _forward_pieces(
        self, input_ids: Tensor, state: ModelState, all_logits: bool, interrupt: Interrupt | None = None
    ) -> Tensor:
        """Long inputs in pieces of ``prefill_piece`` tokens: continuing from the state is exact,
        and the activations of a whole 8k-token file (~100 MB per [T, 3352] projection, plus the
        scan's decay blocks) would otherwise set the server's peak memory."""
        piece = self.prefill_piece
        T = input_ids.shape[0]
        if T <= piece:
            return self._forward(input_ids, state, all_logits, interrupt)
        outs = [self._forward(input_ids[a : a + piece], state, all_logits, interrupt) for a in range(0, T, piece)]
        return torch.cat(outs) if all_logits else outs[-1]

    def _forward(
        self, input_ids: Tensor, state: ModelState, all_logits: bool, interrupt: Interrupt | None = None
    ) -> Tensor:
        cfg = self.config
        T, pos = input_ids.shape[0], state.pos
        x = self.embed_rows(input_ids.to(self.device))
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        x = x.contiguous()
        journaled = state.journal.records
        if T <= GEMV_MAX_ROWS and self._one_call_step_applies() and (T == 1 or not journaled or self._heads_export):
            assert self.kernels is not None
            # deferred rows applied on the way; a journaled verify leaves its rows for keep (state.Journal)
            deferred, journal = state.one_call(T, self.recurrence)
            out = self.kernels.decode_layers(
                x, *self._decode_plan(), state.conv, state.ssm, state.kv.k, state.kv.v, [pos], matmul_threads(),
                deferred, journal,
            )  # fmt: skip
            state.one_call_done(out[1:] if journal is not None else None)
            state.advance(T)
            return self.lm_head_logits(out[0] if all_logits else out[0][-1])
        state.settle()  # the layers below read and write the live states as they are
        rope = rope_tables(cfg, pos, T, self.dtype, self.device) if cfg.uses_rope else None
        rm, eps = cfg.residual_multiplier, cfg.rms_norm_eps
        k = self.kernels
        h = rms_norm(x, self.blocks[0].ln_in, eps, k) if self.blocks else x
        half = len(self.blocks) // 2
        for i, blk in enumerate(self.blocks):
            if i == half and failpoints.fire("forward-midway"):
                raise failpoints.InjectedFault("failpoint forward-midway")  # half the layers have advanced
            if i and interrupt is not None and interrupt(i, len(self.blocks)):
                raise Interrupted(f"interrupted after {i} of {len(self.blocks)} layers")
            # The last layer's outputs feed nothing but the logits: when only the last row's are
            # wanted, its mixer still advances the state over every row, but its output
            # projection and MLP run on that row alone (llama.cpp does the same).
            rows = slice(T - 1, T) if i + 1 == len(self.blocks) and T > 1 and not all_logits else None
            if isinstance(blk.mixer, MambaMixer):
                record = partial(state.record, blk.slot) if journaled else None
                h = blk.mixer.forward(
                    h, state.conv[blk.slot], state.ssm[blk.slot], self.chunk_size, self.recurrent_max, rows, record
                )
            else:
                h = blk.mixer.forward(h, state.kv.k[blk.slot], state.kv.v[blk.slot], pos, rope, rows)
            if rows is not None:
                x = x[rows]
            x, h = add_rms_norm(x, h, rm, blk.ln_post, eps, k)
            h = blk.mlp.forward(h)
            # the next block's input norm (or the final norm, applied in lm_head_logits)
            if i + 1 < len(self.blocks):
                x, h = add_rms_norm(x, h, rm, self.blocks[i + 1].ln_in, eps, k)
            else:
                x = torch.add(x, h, alpha=rm)
        state.advance(T)
        return self.lm_head_logits(x if all_logits else x[-1])

    def keep(self, state: ModelState, n: int) -> None:
        """Keep the first ``n`` rows of ``state``'s last forward, journaled by ``state.journal_next()``
        (speculative decoding's rollback; ModelState.keep and state.Journal say how and why)."""
        if self.single_thread_small_ops:
            with small_ops_single_threaded():
                state.keep(n, self.recurrence)
        else:
            state.keep(n, self.recurrence)

    @property
    def recurrence(self) -> _Recurrence:
        """What ModelState needs of the Mamba layers to take a verify back (state.Recurrence). A new one
        each time (a few attributes): a state with deferred rows keeps it, and a model that kept it too
        would be in a reference cycle, freed only by the garbage collector, not when its service is
        dropped (tests/test_robustness.py reloads a model in a capped address space)."""
        return _Recurrence(self)

    def _mamba_mixers(self) -> dict[int, MambaMixer]:
        """The Mamba mixers by state slot (built once: a model's layers never change)."""
        if self._mixers is None:
            self._mixers = {blk.slot: blk.mixer for blk in self.blocks if isinstance(blk.mixer, MambaMixer)}
        return self._mixers

    def interruptible(self, tokens: int) -> bool:
        """Whether a forward of ``tokens`` asks its ``interrupt`` between layers. A one-call forward
        (up to GEMV_MAX_ROWS tokens on the packed kernels) runs all layers in C++ and cannot stop: 16 rows
        cost ~4-5 decode steps (speculate.py's verify figures), so callers that must answer quickly keep
        such pieces short or avoid them."""
        return not (tokens <= GEMV_MAX_ROWS and self._one_call_step_applies())

    def _one_call_step_applies(self) -> bool:
        """Whether a forward of up to GEMV_MAX_ROWS tokens (a decode step, a speculative verify, a short
        edit) can run as CpuKernels.decode_layers: the packed CPU kernels, no RoPE, every layer on its
        fused kernels, and no failpoint waiting inside the layer loop."""
        return (
            self.fused_step
            and self.packed
            and not self.config.uses_rope
            and self.kernels is not None
            and all(blk.mixer.fused for blk in self.blocks)
            and not failpoints.armed("forward-midway")
        )

    @property
    def _heads_export(self) -> bool:
        """Whether a journaled verify can take the one-call step: every Mamba head's state small enough for
        the kernel's copy of it (kernels.MAMBA_MAX_EXPORT_STATE; larger heads verify layer by layer)."""
        cfg = self.config
        return not self._mamba_mixers() or cfg.mamba_d_head * cfg.mamba_d_state <= MAMBA_MAX_EXPORT_STATE

    def _decode_plan(self) -> tuple[list[Tensor | None], list[int], list[float]]:
        """The weights and sizes CpuKernels.decode_layers takes, flattened once (layout: step.cpp;
        a model's weights never change after construction)."""
        if self._step_plan is None:
            cfg = self.config
            weights: list[Tensor | None] = []
            ints = [cfg.mamba_n_groups, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim]

            def packed(w: Tensor | PackedLinear) -> list[Tensor | None]:
                assert isinstance(w, PackedLinear)
                return [w.weight, w.scale, w.bias]

            for blk in self.blocks:
                mlp = [packed(blk.mlp.w_in), packed(blk.mlp.w_out)]
                assert all(p[2] is None for p in mlp), "the MLP has no bias (step.cpp passes none)"
                weights += [blk.ln_in, blk.ln_post, *mlp[0][:2], *mlp[1][:2]]
                mix = blk.mixer
                if isinstance(mix, MambaMixer):
                    weights += [*packed(mix.w_in), mix.conv_w, mix.conv_b, mix.dt_bias, mix.A, mix.D, mix.norm_w32]
                    weights += packed(mix.w_out)
                else:
                    weights += [*packed(mix.wqkv), *packed(mix.wo)]
                ints.append(0 if blk.kind == "mamba" else 1)
            floats = [cfg.rms_norm_eps, cfg.residual_multiplier, cfg.time_step_min, cfg.time_step_max]
            floats.append(cfg.attention_multiplier)
            self._step_plan = (weights, ints, floats)
        return self._step_plan

    def lm_head_logits(self, hidden: Tensor) -> Tensor:
        """Final norm + (tied) lm_head + 1/logits_scaling, in float32, for the given rows only."""
        h = rms_norm(hidden, self.final_norm, self.config.rms_norm_eps, self.kernels)
        logits = linear(h, self.lm_head).float()
        if self.config.logits_scaling != 1.0:
            logits.div_(self.config.logits_scaling)  # a fresh tensor either way
        return logits


class _Recurrence:
    """state.Recurrence on a model's Mamba layers: what ModelState needs to take a verify back. A state
    with deferred rows refers to it; it refers to nothing but the model (whose weights are not the state's:
    tests/test_memory.py walks what a state holds)."""

    def __init__(self, model: HybridModel) -> None:
        self.model = model
        cfg = model.config
        self.scan_row_width = cfg.mamba_n_heads * (cfg.mamba_d_head + 1) + cfg.mamba_n_groups * cfg.mamba_d_state

    def replay(self, slot: int, inputs: Tensor, conv: Tensor, ssm: Tensor) -> None:
        m = self.model
        m._mamba_mixers()[slot].mix(inputs, conv, ssm, m.chunk_size, m.recurrent_max, slice(-1, None))

    def replay_conv(self, slot: int, inputs: Tensor, conv: Tensor) -> None:
        self.model._mamba_mixers()[slot].replay_conv(inputs, conv)

    def advance(self, slot: int, rows: Tensor, ssm: Tensor) -> None:
        kernels = self.model.kernels
        assert kernels is not None, "deferred rows come from the one-call step, which runs on the kernels"
        kernels.mamba_advance(ssm, rows, self.model.config.mamba_n_groups, matmul_threads())
