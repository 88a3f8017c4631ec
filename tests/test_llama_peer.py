"""The bench's llama.cpp baseline: the GGUF file it writes, and the peer process that times it.

The layout expected here is what llama.cpp's own converter writes for Granite-4.0-H
(conversion/granite.py, read back from a file it made of the real shape): tensor names, GGUF
dimensions (innermost first) and per-tensor types.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from granite_lsp.runtime.config import HybridConfig

gguf = pytest.importorskip("gguf")

from granite_lsp.runtime.llama_gguf import write_gguf  # noqa: E402
from granite_lsp.runtime.microbench import LlamaPeer, bench_model  # noqa: E402
from granite_lsp.runtime.model import HybridModel  # noqa: E402

TINY = json.loads((Path(__file__).resolve().parents[1] / "model" / "tiny" / "config.json").read_text())


def _expected(cfg: HybridConfig) -> dict[str, tuple[list[int], bool]]:
    """name -> (GGUF dims, is a matrix in the file's weight type rather than fp32)."""
    D, E, F, H = cfg.hidden_size, cfg.mamba_intermediate, cfg.shared_intermediate_size, cfg.mamba_n_heads
    G, N, K, C = cfg.mamba_n_groups, cfg.mamba_d_state, cfg.mamba_d_conv, cfg.mamba_conv_dim
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {"token_embd.weight": ([D, cfg.vocab_size], True), "output_norm.weight": ([D], False)}
    for i, kind in enumerate(cfg.layer_kinds):
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = ([D], False)
        out[b + "ffn_norm.weight"] = ([D], False)
        out[b + "ffn_gate.weight"] = ([D, F], True)
        out[b + "ffn_up.weight"] = ([D, F], True)
        out[b + "ffn_down.weight"] = ([F, D], True)
        if kind == "mamba":
            out[b + "ssm_in.weight"] = ([D, 2 * E + 2 * G * N + H], True)
            out[b + "ssm_conv1d.weight"] = ([K, C], False)
            out[b + "ssm_conv1d.bias"] = ([C], False)
            out[b + "ssm_dt.bias"] = ([H], False)
            out[b + "ssm_a"] = ([1, H], False)
            out[b + "ssm_d"] = ([1, H], False)
            out[b + "ssm_norm.weight"] = ([E // G, G], False)
            out[b + "ssm_out.weight"] = ([E, D], True)
        else:
            out[b + "attn_q.weight"] = ([D, q], True)
            out[b + "attn_k.weight"] = ([D, kv], True)
            out[b + "attn_v.weight"] = ([D, kv], True)
            out[b + "attn_output.weight"] = ([q, D], True)
    return out


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_gguf_has_the_layout_llama_cpp_loads(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"tiny-{kind}.gguf"
    write_gguf(TINY, path, kind)
    assert not list(tmp_path.glob("*.part"))
    cfg = HybridConfig.from_dict(TINY)
    reader = gguf.GGUFReader(str(path))
    matrix_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[kind]
    got = {t.name: ([int(d) for d in t.shape], t.tensor_type.name) for t in reader.tensors}
    want = {name: (dims, matrix_type if m else "F32") for name, (dims, m) in _expected(cfg).items()}
    assert got == want
    fields = reader.fields
    assert fields["general.architecture"].contents() == "granitehybrid"
    assert fields["tokenizer.ggml.model"].contents() == "none"
    kv = [cfg.num_key_value_heads if k == "attention" else 0 for k in cfg.layer_kinds]
    assert fields["granitehybrid.attention.head_count_kv"].contents() == kv
    assert fields["granitehybrid.ssm.inner_size"].contents() == cfg.mamba_intermediate
    assert fields["granitehybrid.ssm.time_step_rank"].contents() == cfg.mamba_n_heads
    assert fields["granitehybrid.vocab_size"].contents() == cfg.vocab_size
    assert fields["granitehybrid.embedding_scale"].contents() == pytest.approx(cfg.embedding_multiplier)
    # values: the random matrices at the configured scale, A negative (a decaying state)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    values = gguf.quants.dequantize(emb.data, emb.tensor_type)
    assert np.isfinite(values).all() and abs(float(values.std()) - cfg.initializer_range) < 0.2 * cfg.initializer_range
    a = next(t for t in reader.tensors if t.name == "blk.0.ssm_a")
    assert (np.asarray(a.data) < 0).all()


def test_gguf_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        write_gguf(TINY, tmp_path / "x.gguf", "q4_0")
    with pytest.raises(ValueError, match="bias-free"):
        write_gguf({**TINY, "attention_bias": True}, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.iterdir())


def _llama_cpp_python() -> str | None:
    """An interpreter that imports llama_cpp: GRANITE_LSP_LLAMA_CPP_PYTHON, else this one."""
    python = os.environ.get("GRANITE_LSP_LLAMA_CPP_PYTHON", sys.executable)
    ok = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    return python if ok else None


def test_peer_times_llama_cpp_on_the_written_file(tmp_path: Path) -> None:
    python = _llama_cpp_python()
    if python is None:
        pytest.skip("no llama-cpp-python (set GRANITE_LSP_LLAMA_CPP_PYTHON to an interpreter that has it)")
    path = tmp_path / "tiny-f16.gguf"
    write_gguf(TINY, path, "f16")
    peer = LlamaPeer(python, path, threads=1)
    try:
        assert peer.prefill(list(range(1, 40))) > 0
        steps = peer.decode(list(range(1, 20)), [5, 6, 7])
        assert len(steps) == 3 and all(s > 0 for s in steps)
        with pytest.raises(RuntimeError, match="unknown op"):
            peer._ask({"op": "nonsense"})
        assert peer.prefill([1, 2, 3]) > 0  # still answering
        # and the bench times it in the same rounds as our runtime, on the same tokens
        model = HybridModel.from_config(TINY)
        r = bench_model(model, prefill=20, decode=3, repeat=1, peer=peer)
        for key in ("llama_prefill_tok_s", "llama_decode_tok_s", "llama_decode_median_ms"):
            assert 0 < r[key] < float("inf"), r
    finally:
        peer.close()
    assert peer.proc.returncode == 0


def test_peer_that_cannot_start_says_so(tmp_path: Path) -> None:
    python = _llama_cpp_python()
    if python is None:
        pytest.skip("no llama-cpp-python (set GRANITE_LSP_LLAMA_CPP_PYTHON to an interpreter that has it)")
    missing = tmp_path / "absent.gguf"
    with pytest.raises(RuntimeError, match="peer exited"):
        LlamaPeer(python, missing, threads=1)
