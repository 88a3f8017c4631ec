"""``HybridModel``: GraniteMoeHybrid (Mamba2 + attention) inference that continues from any state.

transformers' CPU path pads every call to its 256-token chunk and keeps state inside an opaque
cache; the completion server instead needs to process just the few tokens an edit changed,
starting from a checkpoint. So ``forward`` takes T >= 1 new tokens plus an explicit
``ModelState`` and advances it in place; small T runs the per-token recurrence, larger T the
chunked SSD scan, and logits are only computed where they are returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import HybridConfig
from .layers import MLP, Attention, MambaMixer, rms_norm, rope_tables
from .matmul import linear, small_ops_single_threaded
from .state import KVCache, MambaSnapshot, ModelState
from .weights import TIED_LM_HEAD, check_state_dict, load_safetensors_dir, make_getter, random_state_dict

# Up to this many new tokens the token-by-token recurrence is used, above it the chunked scan.
# Whole-model continuation after 256 tokens, 1 thread, ms CPU (recurrent / scan): T=1 191/232,
# 2 236/285, 4 289/304, 8 401/394, 16 454/524, 32 728/605: equal within noise from 6 to 16.
DEFAULT_RECURRENT_MAX = 8
# Chunk length of the SSD scan (does not change results). Scan alone on the real shape, 1 thread,
# seconds for 28 layers at T=256/512/1024/2048: chunk 32: 0.31/0.59/1.39/2.34, 64: 0.28/0.58/
# 1.53/2.32, 128: 0.38/0.95/1.57/3.02, 256: 0.60/1.19/2.45/8.03 (64 balances the [L, L] decay
# work against the per-chunk [H, P, N] states: L^2 ~ P*N).
DEFAULT_CHUNK_SIZE = 64
# Run everything but the matmuls on one thread (see matmul.py). On 2 busy cores a 512-token
# prefill with 2 threads took 8.2-10.4 s this way against 22-37 s with torch's default threading
# of the elementwise/scan ops (1 thread throughout: ~6 s). Turn off only on an idle many-core box.
DEFAULT_SINGLE_THREAD_SMALL_OPS = True


@dataclass
class _Block:
    kind: str  # "mamba" | "attention"
    slot: int  # index into the state's Mamba buffers or KV layers
    ln_in: Tensor
    ln_post: Tensor
    mixer: MambaMixer | Attention
    mlp: MLP


class HybridModel:
    """Batch-size-1 GraniteMoeHybrid forward over explicit state (see module docstring)."""

    def __init__(
        self,
        config: HybridConfig,
        embed: Tensor,
        blocks: list[_Block],
        final_norm: Tensor,
        lm_head: Tensor,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        recurrent_max: int = DEFAULT_RECURRENT_MAX,
        single_thread_small_ops: bool = DEFAULT_SINGLE_THREAD_SMALL_OPS,
    ) -> None:
        self.config = config
        self.embed = embed
        self.blocks = blocks
        self.final_norm = final_norm
        self.lm_head = lm_head  # the embedding itself when tied
        self.chunk_size = chunk_size
        self.recurrent_max = recurrent_max
        self.single_thread_small_ops = single_thread_small_ops

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls,
        config: dict[str, Any] | str | Path | HybridConfig,
        state_dict: dict[str, Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        **kwargs: Any,
    ) -> HybridModel:
        """Build from tensors named like transformers' ``GraniteMoeHybridForCausalLM.state_dict()``."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        cfg = HybridConfig.load(config)
        check_state_dict(cfg, state_dict)
        get = make_getter(state_dict, dtype, device)

        def opt(name: str) -> Tensor | None:
            return get(name) if name in state_dict else None

        blocks: list[_Block] = []
        for i, kind in enumerate(cfg.layer_kinds):
            p = f"model.layers.{i}."
            mixer: MambaMixer | Attention
            if kind == "mamba":
                m = p + "mamba."
                mixer = MambaMixer(
                    cfg,
                    in_proj=get(m + "in_proj.weight"),
                    in_bias=opt(m + "in_proj.bias"),
                    conv_weight=get(m + "conv1d.weight", keep_fp32=True),
                    conv_bias=opt(m + "conv1d.bias"),
                    dt_bias=get(m + "dt_bias", keep_fp32=True),
                    A_log=get(m + "A_log", keep_fp32=True),
                    D=get(m + "D", keep_fp32=True),
                    norm_weight=get(m + "norm.weight"),
                    out_proj=get(m + "out_proj.weight"),
                    out_bias=opt(m + "out_proj.bias"),
                )
                slot = sum(1 for b in blocks if b.kind == "mamba")
            else:
                a = p + "self_attn."
                # q, k and v share their input: one fused matmul instead of three
                wqkv = torch.cat([get(a + n + "_proj.weight") for n in "qkv"]).contiguous()
                bqkv = torch.cat([get(a + n + "_proj.bias") for n in "qkv"]) if cfg.attention_bias else None
                mixer = Attention(cfg, wqkv, bqkv, get(a + "o_proj.weight"), opt(a + "o_proj.bias"))
                slot = sum(1 for b in blocks if b.kind == "attention")
            mlp = MLP(get(p + "shared_mlp.input_linear.weight"), get(p + "shared_mlp.output_linear.weight"))
            blocks.append(
                _Block(
                    kind,
                    slot,
                    get(p + "input_layernorm.weight"),
                    get(p + "post_attention_layernorm.weight"),
                    mixer,
                    mlp,
                )
            )
        embed = get("model.embed_tokens.weight")
        lm_head = embed if cfg.tie_word_embeddings else get(TIED_LM_HEAD)
        return cls(cfg, embed, blocks, get("model.norm.weight"), lm_head, **kwargs)

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
        return cls.from_state_dict(cfg, load_safetensors_dir(root), dtype, device, **kwargs)

    # -- properties ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    # -- state -------------------------------------------------------------------------------
    def new_state(self, capacity: int = 1024) -> ModelState:
        """Zero state at position 0 with KV room for ``capacity`` tokens (grows if exceeded)."""
        cfg = self.config
        n_attn = len(cfg.attention_layers)
        kv = KVCache.empty(n_attn, cfg.num_key_value_heads, cfg.head_dim, capacity, self.dtype, self.device)
        n_mamba = len(cfg.mamba_layers)
        conv = tuple(
            torch.zeros(cfg.mamba_d_conv - 1, cfg.mamba_conv_dim, dtype=self.dtype, device=self.device)
            for _ in range(n_mamba)
        )
        ssm_shape = (cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state)
        ssm = tuple(torch.zeros(ssm_shape, dtype=torch.float32, device=self.device) for _ in range(n_mamba))
        return ModelState(kv, MambaSnapshot(conv, ssm, 0))

    # -- compute -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, state: ModelState, all_logits: bool = False) -> Tensor:
        """Process T >= 1 new tokens after ``state`` (advanced in place by T).

        Returns float32 logits [vocab] of the last new position, or [T, vocab] if ``all_logits``.
        If this raises midway the state is inconsistent; restore a snapshot before reusing it.
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
            state.kv.reserve(pos + T)
            if self.single_thread_small_ops:
                with small_ops_single_threaded():
                    return self._forward(input_ids, state, all_logits)
            return self._forward(input_ids, state, all_logits)

    __call__ = forward

    def _forward(self, input_ids: Tensor, state: ModelState, all_logits: bool) -> Tensor:
        cfg = self.config
        T, pos = input_ids.shape[0], state.pos
        x = F.embedding(input_ids.to(self.device), self.embed)
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        rope = rope_tables(cfg, pos, T, self.dtype, self.device) if cfg.uses_rope else None
        rm, eps = cfg.residual_multiplier, cfg.rms_norm_eps
        for blk in self.blocks:
            h = rms_norm(x, blk.ln_in, eps)
            if blk.kind == "mamba":
                h = blk.mixer.forward(h, state.conv[blk.slot], state.ssm[blk.slot], self.chunk_size, self.recurrent_max)
            else:
                h = blk.mixer.forward(h, state.kv.k[blk.slot], state.kv.v[blk.slot], pos, rope)
            x = torch.add(x, h, alpha=rm)
            h = blk.mlp.forward(rms_norm(x, blk.ln_post, eps))
            x = torch.add(x, h, alpha=rm)
        state.pos = pos + T
        state.kv.length = pos + T
        return self.lm_head_logits(x if all_logits else x[-1])

    def lm_head_logits(self, hidden: Tensor) -> Tensor:
        """Final norm + (tied) lm_head + 1/logits_scaling, in float32, for the given rows only."""
        h = rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)
        logits = linear(h, self.lm_head).float()
        if self.config.logits_scaling != 1.0:
            logits.div_(self.config.logits_scaling)  # a fresh tensor either way
        return logits
