"""The shape the benchmarks measure, stated once: IBM Granite-4.0-H-350M's published config.json,
kept in the repository at ``model/granite-4.0-h-350m/config.json`` (no weights: speed does not depend
on their values, so every bench builds random ones). Everything else (the matmul list of one decode
step, the RSS checkpoint, llama.cpp's GGUF file) is derived from it here or from ``HybridConfig``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..runtime.config import HybridConfig

REPO = Path(__file__).resolve().parents[2]
REAL_CONFIG = REPO / "model" / "granite-4.0-h-350m" / "config.json"
# The precisions the benches compare: name -> (weight dtype, quantization).
PRECISIONS = {
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "float16": (torch.float16, None),
    "int8": (torch.float32, "int8"),
}


def real_config() -> dict[str, Any]:
    """The real model's config dict (HF's keys)."""
    if not REAL_CONFIG.is_file():
        raise FileNotFoundError(
            f"{REAL_CONFIG} is missing: the benchmarks run from a source checkout, which ships that config"
        )
    config: dict[str, Any] = json.loads(REAL_CONFIG.read_text())
    return config


def decode_matmuls(cfg: HybridConfig) -> list[tuple[str, int, int]]:
    """(name, N, K) of every matmul one decode step runs, layer by layer, lm_head last. The
    attention projections are listed apart (q, k, v, o), as a checkpoint stores them."""
    D, F = cfg.hidden_size, cfg.shared_intermediate_size
    E, G, N, H = cfg.mamba_intermediate, cfg.mamba_n_groups, cfg.mamba_d_state, cfg.mamba_n_heads
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    mamba = [("mamba.in_proj", 2 * E + 2 * G * N + H, D), ("mamba.out_proj", D, E)]  # in: z, x, B, C, dt
    attn = [("attn.q", q, D), ("attn.k", kv, D), ("attn.v", kv, D), ("attn.o", D, q)]
    mlp = [("mlp.input_linear", 2 * F, D), ("mlp.output_linear", D, F)]
    shapes: list[tuple[str, int, int]] = []
    for kind in cfg.layer_kinds:
        shapes += (mamba if kind == "mamba" else attn) + mlp
    return shapes + [("lm_head", cfg.vocab_size, D)]


# The llama.cpp GGUF kinds timed beside each precision: its fastest paths for it (bf16 weights: F16
# and BF16, which llama.cpp runs on AVX512_BF16 where the CPU has it).
LLAMA_CPP = {
    "float32": ("f32",),
    "bfloat16": ("f16", "bf16"),
    "float16": ("f16",),
    "int8": ("q8_0",),
}
