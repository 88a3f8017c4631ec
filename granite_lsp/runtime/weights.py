"""Getting HF-named weights into the runtime: safetensors checkpoints, state dicts, random init,
and their conversion into the layers (``convert_state_dict``: precision, packing, int8, whether
the CPU kernels run them).

Everything is keyed exactly like transformers' ``GraniteMoeHybridForCausalLM.state_dict()``
so a checkpoint, a live transformers model, and a random init all go through one path
(``expected_shapes`` is the single source of truth for names and shapes). Only safetensors
are read: pickle-based formats (.bin/.pt/.pth) can execute code on load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import kernels, memory
from ..kernels import CpuKernels, PackedLinear
from .config import HybridConfig
from .layers import MLP, Attention, Block, MambaMixer
from .safetensors_files import SafetensorsFiles, load_safetensors_dir

__all__ = ["ModelWeights", "convert_state_dict", "load_safetensors_dir", "random_state_dict"]

TIED_LM_HEAD = "lm_head.weight"
# Non-persistent buffers that some exporters still include; they carry nothing we need.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def expected_shapes(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model needs (lm_head only when untied)."""
    D = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, D),
        "model.norm.weight": (D,),
    }
    if not cfg.tie_word_embeddings:
        shapes[TIED_LM_HEAD] = (cfg.vocab_size, D)
    for i, kind in enumerate(cfg.layer_kinds):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "shared_mlp.input_linear.weight"] = (2 * cfg.shared_intermediate_size, D)
        shapes[p + "shared_mlp.output_linear.weight"] = (D, cfg.shared_intermediate_size)
        if kind == "mamba":
            m = p + "mamba."
            E, H, C = cfg.mamba_intermediate, cfg.mamba_n_heads, cfg.mamba_conv_dim
            shapes[m + "in_proj.weight"] = (E + C + H, D)
            if cfg.mamba_proj_bias:
                shapes[m + "in_proj.bias"] = (E + C + H,)
                shapes[m + "out_proj.bias"] = (D,)
            shapes[m + "conv1d.weight"] = (C, 1, cfg.mamba_d_conv)
            if cfg.mamba_conv_bias:
                shapes[m + "conv1d.bias"] = (C,)
            shapes[m + "dt_bias"] = (H,)
            shapes[m + "A_log"] = (H,)
            shapes[m + "D"] = (H,)
            shapes[m + "norm.weight"] = (E,)
            shapes[m + "out_proj.weight"] = (D, E)
        else:
            a = p + "self_attn."
            q = cfg.num_attention_heads * cfg.head_dim
            kv = cfg.num_key_value_heads * cfg.head_dim
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[a + name + ".weight"] = (rows, D)
                if cfg.attention_bias:
                    shapes[a + name + ".bias"] = (rows,)
            shapes[a + "o_proj.weight"] = (D, q)
            if cfg.attention_bias:
                shapes[a + "o_proj.bias"] = (D,)
    return shapes


def check_state_dict(cfg: HybridConfig, sd: Mapping[str, Tensor]) -> None:
    """Raise ValueError listing missing, unexpected or mis-shaped tensors (without reading lazy ones)."""
    want = expected_shapes(cfg)
    shape = sd.shape_of if isinstance(sd, SafetensorsFiles) else (lambda k: tuple(sd[k].shape))
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(want) if not (k == TIED_LM_HEAD or k.endswith(_IGNORABLE_SUFFIXES)))
    wrong = sorted(f"{k}: {shape(k)} != {want[k]}" for k in want if k in sd and shape(k) != want[k])
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label}: {', '.join(items[:8])}{more}")
        raise ValueError("state dict does not match the config; " + "; ".join(parts))


def random_state_dict(cfg: HybridConfig, seed: int = 0) -> dict[str, Tensor]:
    """Float32 weights initialised roughly like HF's ``_init_weights``: N(0, initializer_range)
    for matrices and conv taps, zero biases, unit norms, A_log = log(1..H), D = 1, dt_bias = 1."""
    gen = torch.Generator().manual_seed(seed)
    std = cfg.initializer_range
    sd: dict[str, Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("A_log"):
            t = torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32))
        elif name.endswith(("dt_bias", ".D", "norm.weight")):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        sd[name] = t
    return sd


def make_getter(
    sd: Mapping[str, Tensor],
    dtype: torch.dtype | None,
    device: torch.device | str,
    consume: bool = False,
) -> Callable[..., Tensor]:
    """Fetch a tensor converted to ``dtype`` (None: as stored) and ``device`` (``keep_fp32`` for
    SSM parameters). ``consume`` removes each tensor from ``sd`` once read, so that a loader owning
    the dict never holds two copies of the weights."""

    def get(name: str, keep_fp32: bool = False) -> Tensor:
        want = torch.float32 if keep_fp32 else dtype
        if consume and isinstance(sd, SafetensorsFiles):
            t = sd.pop_as(name, want)  # converted while it is read
        else:
            t = (sd.pop(name) if consume else sd[name]).detach()  # type: ignore[attr-defined]
        return t.to(device=device, dtype=want or t.dtype).contiguous()

    return get


# -- conversion into the runtime's layers ------------------------------------------------------


@dataclass
class ModelWeights:
    """Everything ``HybridModel`` computes with, converted from HF-named tensors."""

    config: HybridConfig
    embed: Tensor | None  # None when tied and packed: rows of lm_head serve as the embedding
    blocks: list[Block]
    final_norm: Tensor
    lm_head: Tensor | PackedLinear
    kernels: CpuKernels | None  # decided here, once: every layer and matrix got the same answer


def convert_state_dict(
    config: dict[str, Any] | str | Path | HybridConfig,
    state_dict: Mapping[str, Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    quantize: str | None = None,
    packed: bool | None = None,
    consume: bool = False,
) -> ModelWeights:
    """Tensors named like transformers' ``GraniteMoeHybridForCausalLM.state_dict()`` -> layers.

    ``dtype`` is the precision of the weights. ``packed`` (default: on CPU when the AVX2
    kernels build) stores every matrix as a ``kernels.PackedLinear`` and computes activations
    in float32: on CPUs without native bf16/fp16 arithmetic that is both faster and closer
    to float32 than low-precision activations. Otherwise activations use ``dtype`` too.
    ``quantize="int8"`` stores the matrices int8 with a per-row scale (always packed).
    ``consume`` pops tensors from ``state_dict`` as they are converted, so a loader that
    owns the dict never holds two copies of the weights.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    int8 = quantize == "int8"
    on_cpu = torch.device(device).type == "cpu"
    cpu_kernels = kernels.load() if on_cpu else None  # the one decision: the layers get it
    if packed is None:
        packed = on_cpu and (int8 or cpu_kernels is not None)
    if int8 and not packed:
        raise ValueError("int8 weights are always packed (PackedLinear); packed=False cannot hold them")
    if (packed or int8) and not on_cpu:
        raise ValueError("packed / int8 weights are CPU-only; on GPU use bfloat16 or float16")
    if not packed and dtype == torch.float16 and on_cpu:
        dtype = torch.float32  # no fp16 arithmetic worth having on CPU without the kernels
    cfg = HybridConfig.load(config)
    check_state_dict(cfg, state_dict)
    conv = _Converter(cfg, state_dict, dtype, device, packed, int8, consume, cpu_kernels)
    # The embedding first: int8 quantizes it from a whole stored copy (154 MB in bf16), which
    # loaded last, on top of every other weight, made the load the server's memory peak.
    embed, lm_head = conv.embedding_and_lm_head()
    blocks: list[Block] = []
    for i, kind in enumerate(cfg.layer_kinds):
        slot = sum(1 for b in blocks if b.kind == kind)
        blocks.append(conv.block(i, kind, slot))
        if int8:
            # Quantizing leaves each read weight and its scratch freed between long-lived int8
            # copies: trimmed a layer at a time, the heap never grows by more than one layer's.
            memory.release()
    return ModelWeights(cfg, embed, blocks, conv.c("model.norm.weight"), lm_head, cpu_kernels)


class _Converter:
    """Reads HF-named tensors as the layers want them: ``c`` for norms, biases, embeddings and SSM
    parameters (the activation dtype), ``w`` for matrices (stored precision or ``dtype``), ``lin``
    wraps a matrix as the layers compute with it."""

    def __init__(
        self,
        cfg: HybridConfig,
        sd: Mapping[str, Tensor],
        dtype: torch.dtype,
        device: torch.device | str,
        packed: bool,
        int8: bool,
        consume: bool,
        cpu_kernels: CpuKernels | None,
    ) -> None:
        self.cfg, self.sd, self.packed, self.int8, self.kernels = cfg, sd, packed, int8, cpu_kernels
        self.c = make_getter(sd, torch.float32 if packed else dtype, device, consume)
        # matrices; int8 quantizes from the stored precision, a block of rows at a time
        self.w = make_getter(sd, None if int8 else dtype, device, consume)

    def opt(self, name: str) -> Tensor | None:
        return self.c(name) if name in self.sd else None

    def lin(self, w: Tensor, b: Tensor | None = None) -> tuple[Tensor | PackedLinear, Tensor | None]:
        if not self.packed:
            return w, b
        mode = "int8" if self.int8 else "same"
        return PackedLinear.from_weight(w, b, mode=mode, kernels=self.kernels), None

    def embedding_and_lm_head(self) -> tuple[Tensor | None, Tensor | PackedLinear]:
        if self.cfg.tie_word_embeddings:
            # One copy serves both: packed, the embedding lookup dequantizes rows of lm_head.
            lm_head = self.lin(self.w("model.embed_tokens.weight"))[0]
            return (None if self.packed else lm_head), lm_head  # type: ignore[return-value]
        embed = self.c("model.embed_tokens.weight")
        return embed, self.lin(self.w(TIED_LM_HEAD))[0]

    def block(self, i: int, kind: str, slot: int) -> Block:
        p = f"model.layers.{i}."
        mixer = self.mamba(p + "mamba.") if kind == "mamba" else self.attention(p + "self_attn.")
        mlp = MLP(
            self.lin(self.w(p + "shared_mlp.input_linear.weight"))[0],
            self.lin(self.w(p + "shared_mlp.output_linear.weight"))[0],
            self.kernels,
        )
        ln_in, ln_post = self.c(p + "input_layernorm.weight"), self.c(p + "post_attention_layernorm.weight")
        return Block(kind, slot, ln_in, ln_post, mixer, mlp)

    def mamba(self, m: str) -> MambaMixer:
        w_in, b_in = self.lin(self.w(m + "in_proj.weight"), self.opt(m + "in_proj.bias"))
        w_out, b_out = self.lin(self.w(m + "out_proj.weight"), self.opt(m + "out_proj.bias"))
        return MambaMixer(
            self.cfg,
            in_proj=w_in,
            in_bias=b_in,
            conv_weight=self.c(m + "conv1d.weight", keep_fp32=True),
            conv_bias=self.opt(m + "conv1d.bias"),
            dt_bias=self.c(m + "dt_bias", keep_fp32=True),
            A_log=self.c(m + "A_log", keep_fp32=True),
            D=self.c(m + "D", keep_fp32=True),
            norm_weight=self.c(m + "norm.weight"),
            out_proj=w_out,
            out_bias=b_out,
            kernels=self.kernels,
        )

    def attention(self, a: str) -> Attention:
        # q, k and v share their input: one fused matmul instead of three
        wqkv = torch.cat([self.w(a + n + "_proj.weight") for n in "qkv"]).contiguous()
        bqkv = torch.cat([self.c(a + n + "_proj.bias") for n in "qkv"]) if self.cfg.attention_bias else None
        wqkv_, bqkv_ = self.lin(wqkv, bqkv)
        wo, bo = self.lin(self.w(a + "o_proj.weight"), self.opt(a + "o_proj.bias"))
        return Attention(self.cfg, wqkv_, bqkv_, wo, bo, self.kernels)
