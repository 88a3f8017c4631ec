"""llama.cpp as the bench's baseline, timed in the same run: its model file and its process.

The issue's llama.cpp figures were taken on another day, and this shared 2-core machine moves by
10-30% from one minute to the next, more than some of the margins measured against them. So the
bench (``--llama-cpp DIR``) also runs llama.cpp itself, in rounds alternating with ours, and prints
each of our figures as a ratio to its figure from the same rounds.

Two parts live here. ``write_gguf`` makes llama.cpp's model file of the bench's shape: llama.cpp's
own converter needs a tokenizer it recognises (it hashes a tokenization to pick its
pre-tokenizer), and the real one cannot be downloaded here; speed does not depend on weight values
or on the vocabulary, so this writes the keys and tensors that llama.cpp's ``granitehybrid``
loader reads (names, dimensions and per-tensor types as its converter writes them for Granite
4.0-H, checked against a file that converter made) with random values and no vocabulary
(``tokenizer.ggml.model = "none"``: token ids in, logits out). It needs the ``gguf`` package, ggml's
own writer. ``LlamaPeer`` then drives ``llama_peer.py`` in a child process under an interpreter
that has llama-cpp-python: llama.cpp wants its own venv, and its OpenMP runtime and torch's
should not share a process.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.config import HybridConfig

# The GGUF weight kinds written (llama-bench's names, lower-cased: the bench's LLAMA_CPP table
# says which one runs beside each of our precisions).
KINDS = ("f32", "f16", "bf16", "q8_0")
# Bumped whenever write_gguf's output changes, so that files written by an older version in the
# bench's folder are not reused.
LAYOUT_VERSION = 2


def write_gguf(raw_config: dict[str, Any], path: Path, kind: str, seed: int = 0) -> None:
    """Write ``path`` (under a temporary name first: a half-written file must not pass for a model)."""
    try:
        import gguf
    except ImportError as e:
        raise RuntimeError("writing llama.cpp's GGUF file needs the gguf package: pip install -e '.[bench]'") from e

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = HybridConfig.from_dict(raw_config)
    if cfg.num_local_experts or cfg.uses_rope or cfg.attention_bias or cfg.mamba_proj_bias:
        raise ValueError("only the dense, NoPE, bias-free Granite-4.0-H shape is written")
    T, FT = gguf.GGMLQuantizationType, gguf.LlamaFileType
    qtype, file_type = {
        "f32": (T.F32, FT.ALL_F32),
        "f16": (T.F16, FT.MOSTLY_F16),
        "bf16": (T.BF16, FT.MOSTLY_BF16),
        "q8_0": (T.Q8_0, FT.MOSTLY_Q8_0),
    }[kind]
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), "granitehybrid")
    try:
        _write_metadata(w, cfg, int(file_type))
        _write_tensors(w, cfg, qtype, np.random.default_rng(seed))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _write_metadata(w: Any, cfg: HybridConfig, file_type: int) -> None:
    """The keys llama.cpp's ``granitehybrid`` loader reads (``w``: a ``gguf.GGUFWriter``)."""
    D, L, F = cfg.hidden_size, cfg.num_hidden_layers, cfg.shared_intermediate_size
    nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    w.add_name("granite-lsp bench, random weights")
    w.add_file_type(file_type)
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
    # llama.cpp's Granite loader reads this flag as "the attention uses RoPE" and defaults it
    # to true: without it, every attention layer would rotate q and k, as Granite 4.0-H does not.
    w.add_rope_scaling_finetuned(False)
    w.add_attention_scale(cfg.attention_multiplier)
    w.add_embedding_scale(cfg.embedding_multiplier)
    w.add_residual_scale(cfg.residual_multiplier)
    w.add_logit_scale(cfg.logits_scaling)
    w.add_ssm_conv_kernel(cfg.mamba_d_conv)
    w.add_ssm_state_size(cfg.mamba_d_state)
    w.add_ssm_group_count(cfg.mamba_n_groups)
    w.add_ssm_inner_size(cfg.mamba_intermediate)
    w.add_ssm_time_step_rank(cfg.mamba_n_heads)
    w.add_tokenizer_model("none")


def _write_tensors(w: Any, cfg: HybridConfig, qtype: Any, rng: np.random.Generator) -> None:
    """Random tensors with the names, shapes and types llama.cpp's converter writes for Granite 4.0-H."""
    import gguf

    D, F = cfg.hidden_size, cfg.shared_intermediate_size
    H, N, G, K = cfg.mamba_n_heads, cfg.mamba_d_state, cfg.mamba_n_groups, cfg.mamba_d_conv
    E, C = cfg.mamba_intermediate, cfg.mamba_conv_dim
    nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def f32(name: str, a: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))

    def matrix(name: str, rows: int, cols: int) -> None:
        a = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(cfg.initializer_range)
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)  # F32/F16: a plain cast; BF16: rounded

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


def gguf_for(folder: Path, raw_config: dict[str, Any], kind: str) -> Path:
    """The file of weight kind ``kind``, written into ``folder`` on first use. Its name carries a
    hash of the config and of the layout version: a file for another shape, or from an older
    writer, is never taken for this one."""
    tag = hashlib.sha256(json.dumps([raw_config, LAYOUT_VERSION], sort_keys=True).encode()).hexdigest()[:10]
    path = folder / f"granite-hybrid-random-{tag}-{kind}.gguf"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"  writing {path} (llama.cpp's {kind.upper()} file of the same shape) ...", flush=True)
        write_gguf(raw_config, path, kind)
    return path


class PeerError(RuntimeError):
    """The llama.cpp process failed, answered with an error or went away."""


class PeerCrashed(PeerError):
    """The llama.cpp process died without answering (``status``: its exit status, negative for a
    signal: -11 is a segmentation fault)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LlamaPeer:
    """llama.cpp in a child process (``llama_peer.py``) that times what it is asked to run.

    ``extra_bufts`` False loads the weights without llama.cpp's extra buffer types (AMX,
    CPU_REPACK); ``probe`` tokens are evaluated (and a decode step) before the peer counts as
    started, so that a configuration that crashes llama.cpp raises ``PeerCrashed`` here.
    ``batch_failed`` says why this configuration runs no multi-token batch (e.g. "crashed (status
    -11) on a 512-token batch"): its prefill is not timed, and its decode context is fed one token
    at a time (``start_paths`` sets it, with a one-token probe)."""

    def __init__(
        self,
        python: str,
        gguf: Path,
        threads: int,
        ctx: int,
        vocab_size: int | None = None,
        extra_bufts: bool = True,
        probe: int = 0,
        batch_failed: str | None = None,
    ) -> None:
        script = Path(__file__).with_name("llama_peer.py")
        cmd = [python, str(script), str(gguf), "--threads", str(threads), "--ctx", str(ctx), "--probe", str(probe)]
        if not extra_bufts:
            cmd.append("--no-extra-bufts")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            hello = self._read()
            if "error" in hello:
                raise PeerError(f"llama.cpp peer could not start on {gguf}: {hello['error']}")
            if vocab_size is not None and hello.get("n_vocab") != vocab_size:
                raise PeerError(f"llama.cpp sees {hello.get('n_vocab')} tokens in {gguf}, the model has {vocab_size}")
        except BaseException:
            self.close()
            raise
        self.extra_bufts: bool = hello["extra_bufts"]
        self.buffers: dict[str, float] = hello["buffers"]  # MiB of weights by llama.cpp buffer type
        self.batch_failed = batch_failed

    @property
    def repacked(self) -> bool:
        """Whether some weights went to an extra buffer type (anything but llama.cpp's plain CPU
        buffers): only then does turning extra buffer types off run other kernels."""
        return any(name not in ("CPU", "CPU_Mapped") for name in self.buffers)

    def describe(self) -> str:
        """Its configuration, e.g. "extra buffer types on: weights AMX 303 MiB + CPU_Mapped 346 MiB",
        and for one that runs no batch "...; prefill crashed (status -11) on a 512-token batch;
        decode with the context fed one token at a time"."""
        where = " + ".join(f"{name} {mib:.0f} MiB" for name, mib in self.buffers.items())
        config = f"extra buffer types {'on' if self.extra_bufts else 'off'}: weights {where}"
        if self.batch_failed:
            config += f"; prefill {self.batch_failed}; decode with the context fed {ONE_TOKEN_FILL}"
        return config

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise self._gone()
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _gone(self) -> PeerCrashed:
        status = self.proc.wait()
        return PeerCrashed(f"llama.cpp peer exited (status {status}); its stderr is above", status)

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._gone() from None
        out = self._read()
        if "error" in out:
            raise PeerError(f"llama.cpp peer: {out['error']}")
        return out

    def prefill(self, ids: list[int]) -> float:
        """Seconds to evaluate ``ids`` from an empty context."""
        settle()
        return float(self.ask({"op": "prefill", "tokens": ids})["s"])

    def decode(self, ids: list[int], steps: list[int]) -> list[float]:
        """Seconds of each one-token step after ``ids`` (evaluated untimed first: in one batch, or
        one token at a time where batches crash, the peer then keeping that context for the next
        request on the same ``ids``)."""
        settle()
        fill = "one_token" if self.batch_failed else "batch"
        return [float(s) for s in self.ask({"op": "decode", "tokens": ids, "steps": steps, "fill": fill})["s"]]

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# Label of a kind's path with extra buffer types off, beside the kind's own (llama.cpp's default).
NO_EXTRA_BUFTS = "/no-extra-bufts"
# How a path whose batches crash gets its decode context (the report's and the JSON's words).
ONE_TOKEN_FILL = "one token at a time"


def start_paths(
    python: str, gguf: Path, kind: str, threads: int, ctx: int, vocab_size: int, probe: int
) -> tuple[dict[str, LlamaPeer], dict[str, dict[str, str]]]:
    """llama.cpp's working configurations on ``gguf``, started and probed on ``probe`` tokens, by
    label (``kind``: llama.cpp's default, extra buffer types on; ``kind + NO_EXTRA_BUFTS``), and
    those that failed, by label: ``{"config": ..., "failed": "crashed (status -11) ..."}``. A
    configuration that crashes on the probe's batch but runs a one-token probe is started for its
    decode alone (``LlamaPeer.batch_failed``): its one-token steps may be llama.cpp's fastest decode
    (AMX Q8_0: 20.2 ms a step at depth 0 against 30.9 ms without extra buffer types, on this Xeon).

    Which of llama.cpp's paths is fastest depends on the CPU and on the weight kind, and some of
    them crash (on Intel CPUs with AMX, llama.cpp's AMX buffer type crashes at the first batch of
    more than one token, in ggml_backend_amx_mul_mat: upstream issues #20824 and #19184, fix
    proposed in PR #26954), so nothing here is decided per CPU: the default runs; the
    configuration without extra buffer types runs too where the default put weights in one (its
    kernels then differ) or failed; the bench times whichever work in the same rounds and reports
    the fastest per figure. The default failing otherwise than by a crash (llama-cpp-python
    missing, a file it cannot load, another vocabulary) raises PeerError.
    """
    peers: dict[str, LlamaPeer] = {}
    failed: dict[str, dict[str, str]] = {}
    for extra_bufts, label in ((True, kind), (False, kind + NO_EXTRA_BUFTS)):
        if not extra_bufts and kind in peers and not peers[kind].repacked:
            break  # the same kernels as the default's
        config = f"extra buffer types {'on' if extra_bufts else 'off'}"
        try:
            peers[label] = LlamaPeer(python, gguf, threads, ctx, vocab_size, extra_bufts=extra_bufts, probe=probe)
        except PeerCrashed as e:
            batch_failed = f"crashed (status {e.status}) on a {probe}-token batch"
            try:  # its one-token steps may still run: decode alone, the context fed token by token
                peers[label] = LlamaPeer(
                    python, gguf, threads, ctx, vocab_size, extra_bufts=extra_bufts, probe=1, batch_failed=batch_failed
                )
                fed = f"decode alone, the context fed {ONE_TOKEN_FILL}"
                print(f"  llama.cpp {label.upper()} ({config}) {batch_failed}: {fed}", flush=True)
            except PeerError as e1:
                then = f"(status {e1.status}) on a one-token probe" if isinstance(e1, PeerCrashed) else f"then {e1}"
                crashed = f"crashed (status {e.status}) on its {probe}-token probe and {then}"
                failed[label] = {"config": config, "failed": crashed}
        except PeerError as e:
            if extra_bufts:
                raise
            failed[label] = {"config": config, "failed": str(e)}
        if label in failed:
            print(f"  llama.cpp {label.upper()} ({config}) {failed[label]['failed']}", flush=True)
    return peers, failed


def settle() -> None:
    """A moment between one side's run and the other's: threads that just finished (OpenMP's, the
    kernels' pool) poll for up to a millisecond or so before they sleep, and must not do it on the
    cores the other side is being timed on."""
    time.sleep(0.02)
