"""A Granite-4.0-H shape as llama.cpp's GGUF file, random weights, for the bench's llama.cpp baseline.

llama.cpp's own converter needs a tokenizer it recognises (it hashes a tokenization to pick its
pre-tokenizer), and the real one cannot be downloaded here. Speed does not depend on weight values
or on the vocabulary, so this writes the tensors and keys that llama.cpp's ``granitehybrid``
loader reads (names, shapes and per-tensor types as its converter writes them for Granite
4.0-H, checked against a file that converter made) with random values and no vocabulary
(``tokenizer.ggml.model = "none"``: token ids in, logits out). Needs the ``gguf`` package
(``pip install gguf``), which is ggml's own writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import HybridConfig

# GGUF weight kinds, by the name the bench gives them; what llama.cpp's converter does for each:
# matrices in that type, norms, conv, A, D and dt's bias in fp32.
KINDS = ("f32", "f16", "q8_0")


def write_gguf(raw_config: dict[str, Any], path: Path, kind: str, seed: int = 0) -> None:
    """Write ``path`` (a temporary name first: a half-written file must not pass for a model)."""
    import gguf

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = HybridConfig.from_dict(raw_config)
    if cfg.num_local_experts or cfg.uses_rope or cfg.attention_bias or cfg.mamba_proj_bias:
        raise ValueError("only the dense, NoPE, bias-free Granite-4.0-H shape is written")
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[kind]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        kind, gguf.LlamaFileType.MOSTLY_Q8_0
    )
    rng = np.random.default_rng(seed)
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    H, N, G, K = cfg.mamba_n_heads, cfg.mamba_d_state, cfg.mamba_n_groups, cfg.mamba_d_conv
    E, C, F = cfg.mamba_intermediate, cfg.mamba_conv_dim, cfg.shared_intermediate_size
    nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), "granitehybrid")
    w.add_name("granite-lsp bench, random weights")
    w.add_file_type(int(file_type))
    w.add_block_count(L)
    w.add_context_length(cfg.raw.get("max_position_embeddings", 32768))
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(nq)
    w.add_head_count_kv([nkv if k == "attention" else 0 for k in cfg.layer_kinds])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(0)
    w.add_expert_used_count(0)
    w.add_expert_shared_feed_forward_length(F)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(hd)
    w.add_attention_scale(cfg.attention_multiplier)
    w.add_embedding_scale(cfg.embedding_multiplier)
    w.add_residual_scale(cfg.residual_multiplier)
    w.add_logit_scale(cfg.logits_scaling)
    w.add_ssm_conv_kernel(K)
    w.add_ssm_state_size(N)
    w.add_ssm_group_count(G)
    w.add_ssm_inner_size(E)
    w.add_ssm_time_step_rank(H)
    w.add_tokenizer_model("none")

    def f32(name: str, a: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))

    def matrix(name: str, rows: int, cols: int) -> None:
        a = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(cfg.initializer_range)
        if kind == "f32":
            w.add_tensor(name, a)
        elif kind == "f16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    ones = np.ones(D, dtype=np.float32)
    matrix("token_embd.weight", cfg.vocab_size, D)  # tied: llama.cpp reuses it as the output
    for i, k in enumerate(cfg.layer_kinds):
        b = f"blk.{i}."
        f32(b + "attn_norm.weight", ones)
        if k == "mamba":
            matrix(b + "ssm_in.weight", 2 * E + 2 * G * N + H, D)
            f32(b + "ssm_conv1d.weight", rng.standard_normal((C, K), dtype=np.float32) * 0.2)
            f32(b + "ssm_conv1d.bias", np.zeros(C))
            f32(b + "ssm_dt.bias", rng.uniform(-4.0, -2.0, H))
            f32(b + "ssm_a", -rng.uniform(1.0, 16.0, (H, 1)))  # A = -exp(A_log), as the converter stores it
            f32(b + "ssm_d", np.ones((H, 1)))
            f32(b + "ssm_norm.weight", np.ones((G, E // G)))
            matrix(b + "ssm_out.weight", D, E)
        else:
            matrix(b + "attn_q.weight", nq * hd, D)
            matrix(b + "attn_k.weight", nkv * hd, D)
            matrix(b + "attn_v.weight", nkv * hd, D)
            matrix(b + "attn_output.weight", D, nq * hd)
        f32(b + "ffn_norm.weight", ones)
        matrix(b + "ffn_gate.weight", F, D)
        matrix(b + "ffn_up.weight", F, D)
        matrix(b + "ffn_down.weight", D, F)
    f32("output_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
