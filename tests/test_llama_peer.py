"""The bench's llama.cpp baseline (granite_lsp/bench/llama_baseline.py): the GGUF file it writes, the peer
process that times it, and the bench's rounds around it.

The layout expected here is what llama.cpp's own converter writes for Granite-4.0-H
(conversion/granite.py, read back from a file it made of the real shape): tensor names, GGUF
dimensions (innermost first) and per-tensor types.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from granite_lsp.runtime.config import HybridConfig

gguf = pytest.importorskip("gguf")

from granite_lsp.bench.kernels_report import _print_cpu  # noqa: E402
from granite_lsp.bench.llama_baseline import (  # noqa: E402
    KINDS,
    NO_EXTRA_BUFTS,
    LlamaPeer,
    PeerCrashed,
    PeerError,
    gguf_for,
    start_paths,
    write_gguf,
)
from granite_lsp.bench.microbench import LLAMA_CPP, PRECISIONS, bench_model  # noqa: E402
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
    # llama.cpp's Granite loader takes a missing flag for "RoPE on": Granite 4.0-H has none
    assert fields["granitehybrid.rope.scaling.finetuned"].contents() is False
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


def test_gguf_file_names_carry_the_shape(tmp_path: Path) -> None:
    a = gguf_for(tmp_path, TINY, "f16")
    written = a.stat().st_mtime_ns
    assert gguf_for(tmp_path, TINY, "f16") == a and a.stat().st_mtime_ns == written  # found, not rewritten
    b = gguf_for(tmp_path, {**TINY, "num_hidden_layers": 5, "layer_types": TINY["layer_types"][:5]}, "f16")
    assert a != b and a.is_file() and b.is_file()
    assert gguf_for(tmp_path, TINY, "q8_0").name.endswith("-q8_0.gguf")


def test_each_precision_runs_beside_its_fastest_kinds_all_written() -> None:
    kinds = {name: LLAMA_CPP[name] for name in PRECISIONS}
    assert kinds == {"float32": ("f32",), "bfloat16": ("f16", "bf16"), "float16": ("f16",), "int8": ("q8_0",)}
    assert {k for ks in kinds.values() for k in ks} == set(KINDS)


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


@pytest.fixture
def llama_cpp(tmp_path: Path) -> tuple[str, Path]:
    """An interpreter with llama-cpp-python, and the tiny model's F16 file (skips without one)."""
    python = _llama_cpp_python()
    if python is None:
        pytest.skip("no llama-cpp-python (set GRANITE_LSP_LLAMA_CPP_PYTHON to an interpreter that has it)")
    path = tmp_path / "tiny-f16.gguf"
    write_gguf(TINY, path, "f16")
    return python, path


def test_peer_times_llama_cpp_on_the_written_file(llama_cpp: tuple[str, Path]) -> None:
    python, path = llama_cpp
    peer = LlamaPeer(python, path, threads=1, ctx=64, vocab_size=TINY["vocab_size"])
    try:
        # it says where llama.cpp put the weights (its own "model buffer size" lines)
        assert peer.extra_bufts and peer.buffers and all(mib > 0 for mib in peer.buffers.values())
        assert peer.describe().startswith("extra buffer types on: weights ")
        assert peer.prefill(list(range(1, 40))) > 0
        steps = peer.decode(list(range(1, 20)), [5, 6, 7])
        assert len(steps) == 3 and all(s > 0 for s in steps)
        with pytest.raises(PeerError, match="unknown op"):
            peer.ask({"op": "nonsense"})
        with pytest.raises(PeerError):  # longer than the context
            peer.prefill(list(range(1, 700)))
        assert peer.prefill([1, 2, 3]) > 0  # still answering
        # and the bench times it in the same rounds as our runtime, on the same tokens
        model = HybridModel.from_config(TINY)
        r = bench_model(model, prefill=20, decode=3, repeat=1, peers={"f16": peer})
        for key in ("prefill_tok_s", "decode_tok_s", "decode_ms", "decode0_ms", "decode_best_ms"):
            assert 0 < r["llama"]["f16"][key] < float("inf"), r
    finally:
        peer.close()
    assert peer.proc.returncode == 0


def test_peer_that_cannot_start_says_so(tmp_path: Path) -> None:
    # Without llama-cpp-python the child fails at its import, with it at the missing file: both
    # answer an error, which the bench raises (and the child is gone).
    python = _llama_cpp_python() or sys.executable
    with pytest.raises(PeerError, match="could not start"):
        LlamaPeer(python, tmp_path / "absent.gguf", threads=1, ctx=64)


def test_peer_under_an_interpreter_without_llama_cpp_says_which(tmp_path: Path) -> None:
    if subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        pytest.skip("this interpreter has llama-cpp-python")
    with pytest.raises(PeerError, match="cannot import llama_cpp"):
        LlamaPeer(sys.executable, tmp_path / "any.gguf", threads=1, ctx=64)


def test_peer_with_another_vocabulary_is_refused(llama_cpp: tuple[str, Path]) -> None:
    python, path = llama_cpp
    with pytest.raises(PeerError, match="tokens"):
        LlamaPeer(python, path, threads=1, ctx=64, vocab_size=TINY["vocab_size"] + 1)


def test_peer_that_cannot_load_its_file_says_so(llama_cpp: tuple[str, Path], tmp_path: Path) -> None:
    # a file cut short: llama.cpp refuses it at load (an error answer, not a crash), and
    # start_paths passes that on rather than trying other configurations on a broken file
    python, path = llama_cpp
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PeerError, match="could not start") as e:
        start_paths(python, cut, "f16", threads=1, ctx=64, vocab_size=TINY["vocab_size"], probe=8)
    assert not isinstance(e.value, PeerCrashed)


@pytest.mark.parametrize("kind", ["q8_0", "f16"])
def test_start_paths_runs_what_works_and_names_what_crashed(
    llama_cpp: tuple[str, Path], tmp_path: Path, kind: str
) -> None:
    # On a CPU with AMX, llama.cpp's AMX buffer type takes the Q8_0 (and F16) matrices and its
    # Q8_0 batch kernel crashes (upstream #20824): there the default crashes at its probe and the
    # path without extra buffer types is what runs. Elsewhere the default runs. Either way at
    # least one path works, and each failure carries the status the process died with.
    python, _ = llama_cpp
    path = tmp_path / f"tiny-{kind}.gguf"
    write_gguf(TINY, path, kind)
    peers, failed = start_paths(python, path, kind, threads=1, ctx=64, vocab_size=TINY["vocab_size"], probe=40)
    try:
        assert peers and set(peers) | set(failed) <= {kind, kind + NO_EXTRA_BUFTS} and not set(peers) & set(failed)
        for label, f in failed.items():  # crashed on the probe's batch and on a one-token probe
            assert f["config"] == f"extra buffer types {'off' if label.endswith(NO_EXTRA_BUFTS) else 'on'}"
            status = int(f["failed"].removeprefix("crashed (status ").split(")")[0])
            assert status != 0 and "on its 40-token probe and " in f["failed"], f
        if kind in peers and not peers[kind].repacked:
            assert set(peers) == {kind}  # the same kernels without extra buffer types: not run twice
        else:
            assert kind + NO_EXTRA_BUFTS in peers  # the default crashed or repacked: the plain path too
        plain = peers.get(kind + NO_EXTRA_BUFTS)
        if plain is not None:
            assert not plain.extra_bufts and not plain.repacked and set(plain.buffers) <= {"CPU", "CPU_Mapped"}
        for peer in peers.values():
            if peer.batch_failed:  # crashed on the batch, runs one-token steps: decode alone
                assert peer.batch_failed.startswith("crashed (status -") and "on a 40-token batch" in peer.batch_failed
                assert len(peer.decode(list(range(1, 40)), [5, 6])) == 2
            else:
                assert peer.prefill(list(range(1, 40))) > 0
    finally:
        for peer in peers.values():
            peer.close()


def test_context_fed_one_token_at_a_time_is_kept_and_matches_a_batch(llama_cpp: tuple[str, Path]) -> None:
    # On the F16 file (batches run on any CPU), a peer told its batches crash feeds a decode's
    # context one token at a time: the steps after it see the state a batch leaves (logit sums
    # within rounding of the batch's), a second request on the same context starts from the kept
    # copy (the same bits), and another context gives other logits.
    python, path = llama_cpp
    peer = LlamaPeer(python, path, threads=1, ctx=64, vocab_size=TINY["vocab_size"], probe=1, batch_failed="x")
    try:
        ids, steps = list(range(1, 30)), [5, 6, 7]

        def sums(fill: str, context: list[int]) -> list[float]:
            return [
                float(x) for x in peer.ask({"op": "decode", "tokens": context, "steps": steps, "fill": fill})["sums"]
            ]

        batch, fed, kept = sums("batch", ids), sums("one_token", ids), sums("one_token", ids)
        assert fed == pytest.approx(batch, rel=1e-3, abs=1e-3) and kept == fed
        assert sums("one_token", []) != fed  # depth 0: nothing to feed, the kept context stays
        assert sums("one_token", ids) == fed
        assert sums("one_token", ids[:-1]) != fed
        assert len(peer.decode(ids, steps)) == 3  # LlamaPeer.decode asks for that fill itself
        assert peer.describe().endswith("; prefill x; decode with the context fed one token at a time")
    finally:
        peer.close()
    assert peer.proc.returncode == 0


def test_path_whose_batches_crash_is_timed_on_decode_alone(
    llama_cpp: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Real llama.cpp on the tiny Q8_0 file: on a CPU with AMX its default configuration crashes on
    # any batch of more than one token (upstream #20824) but runs one-token steps. start_paths then
    # keeps it for decode, the bench feeds its context one token at a time and reports its prefill
    # as crashed, and its decode figures compete for the fastest path's.
    python, _ = llama_cpp
    q8 = tmp_path / "tiny-q8_0.gguf"
    write_gguf(TINY, q8, "q8_0")
    peers, failed = start_paths(python, q8, "q8_0", threads=1, ctx=64, vocab_size=TINY["vocab_size"], probe=20)
    try:
        if "q8_0" not in peers or not peers["q8_0"].batch_failed:
            pytest.skip(f"llama.cpp's default Q8_0 path runs batches on this CPU (or fails outright: {failed})")
        model = HybridModel.from_config(TINY)
        r = bench_model(model, prefill=20, decode=3, repeat=1, peers=peers)
        for label, peer in peers.items():
            r["llama"][label]["config"] = peer.describe()
    finally:
        for peer in peers.values():
            peer.close()
    q = r["llama"]["q8_0"]
    assert "failed" not in q and "prefill_tok_s" not in q, q
    assert q["prefill_failed"].startswith("crashed (status -") and q["prefill_failed"].endswith("on a 20-token batch")
    assert q["decode_fill"] == "one token at a time"
    assert 0 < q["decode_ms"] < float("inf") and 0 < q["decode0_ms"] < float("inf")
    assert q["config"].startswith("extra buffer types on: weights ") and "one token at a time" in q["config"]
    plain = r["llama"]["q8_0" + NO_EXTRA_BUFTS]  # the same kind without AMX runs batches
    assert plain["prefill_tok_s"] > 0 and plain["decode_fill"] == "one batch"
    r["weight_mb"] = model.weight_bytes() / 2**20
    _print_cpu("int8", r, model.packed, 20)
    out = capsys.readouterr().out
    assert f"prefill {q['prefill_failed']}" in out and "llama.cpp Q8_0 same rounds: decode depth 20" in out
    fastest = out.split("vs llama.cpp's fastest path here: ")[1]
    assert fastest.startswith("decode x") and "prefill x" in fastest and "(Q8_0/NO-EXTRA-BUFTS)\n" in fastest


def test_bench_goes_on_past_a_peer_that_crashes(llama_cpp: tuple[str, Path], tmp_path: Path) -> None:
    # Real peers: one killed by SIGSEGV before the rounds (as a crash inside llama.cpp ends it), and
    # on Q8_0 with llama.cpp's default configuration and no probe, which on a CPU with AMX crashes
    # in the first prefill of the rounds by itself. The bench records each crash with its status
    # and times the others.
    python, path = llama_cpp
    q8 = tmp_path / "tiny-q8_0.gguf"
    write_gguf(TINY, q8, "q8_0")
    peers = {
        "f16": LlamaPeer(python, path, threads=1, ctx=64, vocab_size=TINY["vocab_size"]),
        "killed": LlamaPeer(python, path, threads=1, ctx=64, vocab_size=TINY["vocab_size"]),
        "q8_0": LlamaPeer(python, q8, threads=1, ctx=64, vocab_size=TINY["vocab_size"]),
    }
    try:
        os.kill(peers["killed"].proc.pid, signal.SIGSEGV)
        peers["killed"].proc.wait()
        r = bench_model(HybridModel.from_config(TINY), prefill=20, decode=3, repeat=1, peers=peers)  # type: ignore[arg-type]
    finally:
        for peer in peers.values():
            peer.close()
    assert r["llama"]["killed"] == {"failed": f"crashed (status {-signal.SIGSEGV}) during the rounds"}
    assert 0 < r["llama"]["f16"]["prefill_tok_s"] < float("inf") and r["llama"]["f16"]["decode0_ms"] > 0
    q = r["llama"]["q8_0"]
    assert q.get("failed", "").startswith("crashed (status -") or q["decode_ms"] > 0, q
    assert r["prefill_tok_s"] > 0 and r["decode_ms"] > 0  # ours, all the same


class _RecordingPeer:
    """Stands in for llama.cpp where it is not installed (CI), to check the bench's rounds: what it
    is asked, and which of its answers become the figures. It answers set times."""

    batch_failed = None  # runs batches

    def __init__(self) -> None:
        self.prefills: list[list[int]] = []
        self.decodes: list[tuple[list[int], list[int]]] = []

    def prefill(self, ids: list[int]) -> float:
        self.prefills.append(ids)
        return [9.0, 2.0, 3.0][len(self.prefills) - 1]  # the first (warm-up) is the slowest

    def decode(self, ids: list[int], steps: list[int]) -> list[float]:
        self.decodes.append((ids, steps))
        return [5.0] + [0.5 + 0.1 * i for i in range(1, len(steps))]


def test_bench_rounds_give_the_peers_the_same_tokens_and_report_medians() -> None:
    model = HybridModel.from_config(TINY)
    peers = {"f16": _RecordingPeer(), "bf16": _RecordingPeer()}
    r = bench_model(model, prefill=12, decode=4, repeat=2, peers=peers)  # type: ignore[arg-type]
    for kind, peer in peers.items():
        assert len(peer.prefills) == 3 and all(ids == peer.prefills[0] and len(ids) == 12 for ids in peer.prefills)
        t = r["llama"][kind]
        assert t["prefill_tok_s"] == pytest.approx(12 / statistics.median([2.0, 3.0]))  # the warm-up's 9 s left out
        # decode after the prompt, then at depth 0: three rounds each, the same tokens as ours
        assert len(peer.decodes) == 6
        deep, shallow = peer.decodes[:3], peer.decodes[3:]
        for ids, steps in deep:
            assert ids == peer.prefills[0] and len(steps) == 4 and ids + steps == deep[0][0] + deep[0][1]
        for ids, steps in shallow:
            assert ids == [] and steps == deep[0][0][:4]
        # the first step of the first round is warm-up, as for ours; the 5 s steps of later rounds count
        counted = [0.6, 0.7, 0.8] + [5.0, 0.6, 0.7, 0.8] * 2
        assert t["decode_ms"] == pytest.approx(1e3 * statistics.median(counted))
        assert t["decode0_ms"] == pytest.approx(1e3 * statistics.median(counted))
        assert t["decode_best_ms"] == pytest.approx(600)
    assert r["decode_depth"] == 12 and r["decode_ms"] >= r["decode_best_ms"] > 0 and r["decode0_ms"] > 0


def test_report_names_a_crashed_path_and_the_fastest_that_ran(capsys: pytest.CaptureFixture[str]) -> None:
    model = HybridModel.from_config(TINY)
    r = bench_model(model, prefill=12, decode=4, repeat=1, peers={"q8_0" + NO_EXTRA_BUFTS: _RecordingPeer()})  # type: ignore[dict-item]
    r["llama"]["q8_0" + NO_EXTRA_BUFTS]["config"] = "extra buffer types off: weights CPU_Mapped 346 MiB"
    r["llama"]["q8_0"] = {"config": "extra buffer types on", "failed": "crashed (status -11) on its 12-token probe"}
    r["weight_mb"] = model.weight_bytes() / 2**20
    _print_cpu("int8", r, model.packed, 12)
    out = capsys.readouterr().out
    assert "llama.cpp Q8_0 (extra buffer types on): crashed (status -11) on its 12-token probe" in out
    assert "llama.cpp Q8_0/NO-EXTRA-BUFTS same rounds:" in out and "extra buffer types off: weights CPU_Mapped" in out
    assert "vs llama.cpp's fastest path here: decode x" in out and "prefill x" in out and "(Q8_0/NO-EXTRA-BUFTS)" in out
    assert "issue #4" not in out  # llama.cpp ran in this bench: no figures from another day
