"""Speed of the runtime on the real Granite-4.0-H-350M shape with random weights, per precision.

Run ``granite-lsp bench --kernels`` (or ``python -m granite_lsp.bench.microbench``). Speed does
not depend on weight values, so no checkpoint is needed. The header names the CPU, its ISA flags
and the level the kernels run at (``kernels/isa.py``; ``GRANITE_LSP_ISA`` caps it). For each
precision it prints the median decode step after the prompt and at depth 0 (llama-bench's tg), the
median prefill (the best of each beside it) and, measured in the same run, the model's matmuls alone (lm_head included):
through our kernels on the same packed weights, and through torch's own kernels on weights of
the same shapes and precision (``F.linear``; ``torch._weight_int8pack_mm`` for int8). Decode on
CPU is bound by streaming those weights from memory, so "decode step / matmuls alone" says how
much is left to gain outside them. ``--rss`` also starts the real server on a checkpoint
directory of that shape (written once, bf16 like Granite's) and reports its peak RSS after a
completion. ``--sweep`` times the scan chunk sizes and the recurrent/scan threshold that the
defaults in ``model.py`` were chosen from. With ``--llama-cpp DIR`` llama.cpp runs in this bench,
alternating with ours round by round on the same tokens, on each GGUF kind ``LLAMA_CPP`` pairs with
the precision (its fastest paths: bf16 beside both F16 and BF16), each in the configurations of
llama.cpp that work on this CPU (``llama_baseline.start_paths``: its default, and without its
extra buffer types where the default repacks weights or crashes; one whose batches crash but
whose one-token steps run is timed on decode alone, its context fed one token at a time), and
each of our figures gets a ratio to each path's from the same rounds and to the fastest of them
(``llama_baseline.py``); a path that crashes is reported with its exit status and the bench goes on with the others;
without it, issue #4's llama-bench figures (another machine, another day) are printed for
orientation only. ``--device cuda`` builds the model on the GPU instead (timings
synchronize the device; it says whether the Mamba layers ran mamba_ssm / causal_conv1d kernels or
the torch ops, see ``runtime/cuda_kernels.py``; no llama.cpp comparison there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import PackedLinear, isa
from ..runtime import cuda_kernels
from ..runtime.matmul import linear, matmul_threads, small_ops_single_threaded
from ..runtime.model import HybridModel
from .kernels_report import _print_cpu, _print_gpu
from .llama_baseline import (
    NO_EXTRA_BUFTS,
    ONE_TOKEN_FILL,
    LlamaPeer,
    PeerCrashed,
    PeerError,
    gguf_for,
    settle,
    start_paths,
)
from .rss import server_peak_rss_mb
from .shape import LLAMA_CPP, PRECISIONS, real_config
from .sweeps import sweep_chunk_sizes, sweep_threshold
from .timing import _sync, _time


def linear_weights(model: HybridModel) -> list[torch.Tensor | PackedLinear]:
    """Every matrix a decode step multiplies by, in order (the tied lm_head last)."""
    ws: list[torch.Tensor | PackedLinear] = []
    for blk in model.blocks:
        mix = blk.mixer
        ws += [mix.w_in, mix.w_out] if blk.kind == "mamba" else [mix.wqkv, mix.wo]  # type: ignore[union-attr]
        ws += [blk.mlp.w_in, blk.mlp.w_out]
    return ws + [model.lm_head]


def _torch_linear(x: torch.Tensor, w: torch.Tensor | PackedLinear) -> torch.Tensor:
    """torch's own kernel for a weight in its stored precision (the baseline our kernels beat)."""
    if isinstance(w, PackedLinear):
        if w.scale is not None:
            return torch._weight_int8pack_mm(x, w.weight, w.scale)
        return F.linear(x.to(w.weight.dtype), w.weight)
    return F.linear(x, w)


def _kernel_linear(x: torch.Tensor, w: torch.Tensor | PackedLinear) -> torch.Tensor:
    """Our kernel for one matmul, called as directly as Python can (no wrapper): the tightest
    "matmuls alone" time to hold a decode step against."""
    return w.product(x, matmul_threads()) if isinstance(w, PackedLinear) else linear(x, w)


def time_linears(model: HybridModel, T: int, repeat: int, fn: Callable[..., torch.Tensor] = _torch_linear) -> float:
    """Seconds for the model's matmuls alone on T rows (lm_head on the last row only)."""
    ws = linear_weights(model)
    xs = [torch.randn(T, w.shape[1], dtype=model.dtype, device=model.device) for w in ws[:-1]]
    x_head = torch.randn(1, model.lm_head.shape[1], dtype=model.dtype, device=model.device)

    def run() -> None:
        with torch.inference_mode():
            for w, x in zip(ws[:-1], xs, strict=True):
                fn(x, w)
            fn(x_head, ws[-1])

    return _time(run, repeat)


Peers = dict[str, LlamaPeer]  # llama.cpp processes by path label (GGUF kind[/config]), timed beside ours


def _live(peers: Peers, dead: dict[str, str]) -> list[tuple[str, LlamaPeer]]:
    """The peers still answering: one that crashed or failed in an earlier round is left out."""
    return [(label, peer) for label, peer in peers.items() if label not in dead]


def _drop(label: str, e: PeerError, dead: dict[str, str]) -> None:
    """Record why a peer stopped (``dead[label]``): the bench goes on with the others."""
    dead[label] = f"crashed (status {e.status}) during the rounds" if isinstance(e, PeerCrashed) else f"failed: {e}"
    print(f"  llama.cpp {label.upper()} {dead[label]}: left out of the figures", flush=True)


def _time_prefill(
    model: HybridModel, ids: torch.Tensor, prefill: int, decode: int, repeat: int, peers: Peers, dead: dict[str, str]
) -> tuple[list[float], dict[str, list[float]]]:
    """Our prefill times and each llama.cpp peer's. Each round times ours, then every live peer's on
    the same tokens; the first round is warm-up for all. A peer whose batches crash
    (``batch_failed``) runs no prefill: its decode alone is timed."""
    id_list = ids.tolist()
    ours: list[float] = []
    theirs: dict[str, list[float]] = {kind: [] for kind in peers}
    for r in range(repeat + 1):
        if peers:
            settle()
        _sync()
        t0 = time.perf_counter()
        model.forward(ids[:prefill], model.new_state(prefill + decode))
        _sync()
        if r:
            ours.append(time.perf_counter() - t0)
        for kind, peer in _live(peers, dead):
            if peer.batch_failed:
                continue
            try:
                t = peer.prefill(id_list[:prefill])
            except PeerError as e:
                _drop(kind, e, dead)
                continue
            if r:
                theirs[kind].append(t)
    return ours, theirs


def _time_decode(
    model: HybridModel,
    ids: torch.Tensor,
    depth: int,
    decode: int,
    repeat: int,
    peers: Peers,
    dead: dict[str, str],
    matmuls: bool,
) -> tuple[list[float], list[float], list[float], dict[str, list[float]]]:
    """Seconds of: decode steps after ``depth`` tokens, the same steps layer by layer, the matmuls
    alone (when ``matmuls``), each llama.cpp peer's steps on the same tokens.

    Decode steps and the matmuls alone are timed in alternation, so that both see the same
    machine (a shared 2-core box drifts by 30% within a minute). The same steps layer by layer
    (``fused_step`` off) are timed in the same rounds: what the one-call step (kernels/step.cpp)
    saves, where it applies (not on GPU, nor without the kernels).
    """
    id_list = ids.tolist()
    state = model.new_state(depth + decode + 1)
    if depth:
        model.forward(ids[:depth], state)
    snap = state.snapshot()
    steps: list[float] = []
    layered: list[float] = []
    lin1: list[float] = []
    theirs: dict[str, list[float]] = {kind: [] for kind in peers}
    fused_step = model.fused_step
    paths = ((True, steps), (False, layered)) if model._one_call_step_applies() else ((fused_step, steps),)
    for r in range(repeat + 1):
        for one_call, out in paths:
            model.fused_step = one_call
            state.restore(snap)
            if peers:
                settle()
            for i in range(decode):
                _sync()
                t0 = time.perf_counter()
                model.forward(ids[depth + i : depth + i + 1], state)
                _sync()
                if r or i:  # first step of the first round is warm-up
                    out.append(time.perf_counter() - t0)
        if matmuls:
            with small_ops_single_threaded():
                lin1.append(time_linears(model, 1, 2, _kernel_linear))  # the runtime's own matmuls
        for kind, peer in _live(peers, dead):
            try:
                got = peer.decode(id_list[:depth], id_list[depth : depth + decode])
            except PeerError as e:
                _drop(kind, e, dead)
                continue
            theirs[kind] += got if r else got[1:]  # the same warm-up step as ours left out
    model.fused_step = fused_step
    return steps, layered, lin1, theirs


def bench_model(
    model: HybridModel, prefill: int, decode: int, repeat: int, peers: Peers | None = None
) -> dict[str, Any]:
    """Figures of one model: medians over the rounds (the best ones beside them, marked ``best``).

    Decode is timed at two depths, as llama-bench's tg (depth 0: the first steps of an empty
    context) and after a ``prefill``-token prompt (the editor's case); ``decode_layered_ms`` is None
    where there is no one-call step. ``llama`` holds each peer's figures by label, or for one that
    crashed or failed in the rounds ``{"failed": "crashed (status -11) during the rounds"}``: the
    others' figures and ours still come. A peer whose batches crash has no ``prefill_tok_s`` but
    ``prefill_failed`` (why), and its decode figures; ``decode_fill`` says how each peer's decode
    context was evaluated ("one batch", or "one token at a time")."""
    peers = peers or {}
    dead: dict[str, str] = {}
    ids = torch.randint(0, model.config.vocab_size, (prefill + decode,))
    pf, peer_pf = _time_prefill(model, ids, prefill, decode, repeat, peers, dead)
    steps, layered, lin1, peer_steps = _time_decode(model, ids, prefill, decode, repeat, peers, dead, True)
    steps0, _, _, peer_steps0 = _time_decode(model, ids, 0, decode, repeat, peers, dead, False)
    with small_ops_single_threaded():
        t_oursp = time_linears(model, prefill, repeat, _kernel_linear)
    t_torch1 = time_linears(model, 1, max(5, repeat * 3))
    med = statistics.median
    return {
        "prefill_tok_s": prefill / med(pf),
        "prefill_s": med(pf),
        "prefill_best_tok_s": prefill / min(pf),
        "prefill_linear_s": t_oursp,
        "decode_depth": prefill,
        "decode_ms": med(steps) * 1e3,
        "decode_tok_s": 1.0 / med(steps),
        "decode_best_ms": min(steps) * 1e3,
        "decode0_ms": med(steps0) * 1e3,
        "decode0_tok_s": 1.0 / med(steps0),
        "decode_layered_ms": med(layered) * 1e3 if layered else None,
        "linear_ms": min(lin1) * 1e3,
        "torch_linear_ms": t_torch1 * 1e3,
        "llama": {
            kind: (
                {"failed": dead[kind]}
                if kind in dead
                else {
                    **(
                        {"prefill_failed": peers[kind].batch_failed, "decode_fill": ONE_TOKEN_FILL}
                        if peers[kind].batch_failed
                        else {"prefill_tok_s": prefill / med(peer_pf[kind]), "decode_fill": "one batch"}
                    ),
                    "decode_ms": med(peer_steps[kind]) * 1e3,
                    "decode_tok_s": 1.0 / med(peer_steps[kind]),
                    "decode_best_ms": min(peer_steps[kind]) * 1e3,
                    "decode0_ms": med(peer_steps0[kind]) * 1e3,
                    "decode0_tok_s": 1.0 / med(peer_steps0[kind]),
                }
            )
            for kind in peers
        },
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--precisions", "--dtypes", default="float32,bfloat16,float16,int8")
    ap.add_argument("--rss", action="store_true", help="also measure the server's peak RSS per precision")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/granite-lsp-bench"))
    ap.add_argument("--sweep", action="store_true", help="also time chunk sizes and the recurrent threshold")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (GPU: bfloat16/float16/float32, no int8)")
    ap.add_argument(
        "--llama-cpp",
        type=Path,
        default=None,
        metavar="DIR",
        help="also time llama.cpp in the same rounds, on GGUF files of the same shape kept in DIR "
        "(written there on first use; needs the gguf package here and llama-cpp-python under --llama-cpp-python)",
    )
    ap.add_argument(
        "--llama-cpp-python",
        default=sys.executable,
        metavar="PYTHON",
        help="an interpreter that can import llama_cpp (default: this one)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    if not on_cpu and args.sweep:
        ap.error("--sweep times the CPU scan; run it with --device cpu")
    if not on_cpu and "int8" in args.precisions.split(","):
        ap.error("int8 weights are CPU-only (packed kernels); on a GPU use --precisions bfloat16,float16,float32")
    if not on_cpu and args.llama_cpp:
        ap.error("--llama-cpp runs llama.cpp's CPU build; use it with --device cpu")
    if args.llama_cpp_python != sys.executable and not args.llama_cpp:
        ap.error("--llama-cpp-python is the interpreter for --llama-cpp DIR; give both")
    return args


def _machine_report(threads: int) -> dict[str, Any]:
    """The CPU model, its ISA flags that matter here, and the level our kernels run at."""
    return {
        **isa.cpu_report(),
        "isa_level": isa.level() or "none (kernels unavailable)",
        "isa_note": isa.note(),
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    cfg = real_config()
    where = f"threads {torch.get_num_threads()}"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, Mamba layers: {cuda_kernels.describe(device)}"
    machine = _machine_report(args.threads) if on_cpu else {}
    print(
        f"torch {torch.__version__}, {where}, "
        f"hidden {cfg.get('hidden_size')} x {cfg.get('num_hidden_layers')} layers, "
        f"decode after {args.prefill} tokens and after 0, prefill of {args.prefill}"
    )
    if machine:
        print(
            f"CPU {machine['cpu']}; ISA flags {' '.join(machine['isa_flags'])}; kernels' level"
            f" {machine['isa_level']}{' (' + machine['isa_note'] + ')' if machine['isa_note'] else ''}"
        )
    results: dict[str, dict[str, Any]] = {}
    for name in args.precisions.split(","):
        dtype, quantize = PRECISIONS[name]
        # llama.cpp's file first: writing it holds its weights in memory, which the model's
        # would otherwise join
        ggufs = {kind: gguf_for(args.llama_cpp, cfg, kind) for kind in LLAMA_CPP[name]} if args.llama_cpp else {}
        model = HybridModel.from_config(cfg, dtype=dtype, quantize=quantize, device=device)
        peers: Peers = {}
        failed: dict[str, dict[str, str]] = {}
        try:
            ctx = args.prefill + args.decode + 8
            for kind, gguf in ggufs.items():
                try:
                    started, failed_here = start_paths(
                        args.llama_cpp_python, gguf, kind, args.threads, ctx, model.config.vocab_size, args.prefill
                    )
                except PeerError as e:
                    started, failed_here = {}, {kind: {"config": "extra buffer types on", "failed": str(e)}}
                    print(f"  llama.cpp {kind.upper()}: {e}", flush=True)
                peers.update(started)
                failed.update(failed_here)
            r = bench_model(model, args.prefill, args.decode, args.repeat, peers)
        finally:
            for peer in peers.values():
                peer.close()
        for label, peer in peers.items():
            r["llama"][label]["config"] = peer.describe()
        # each kind's paths in start_paths' order (its default first), those that failed included
        r["llama"] = {
            label: r["llama"].get(label) or failed[label]
            for kind in ggufs
            for label in (kind, kind + NO_EXTRA_BUFTS)
            if label in peers or label in failed
        }
        r["weight_mb"] = model.weight_bytes() / 2**20
        if on_cpu:
            _print_cpu(name, r, model.packed, args.prefill)
            if args.sweep:
                sweep_chunk_sizes(model, args.repeat)
                sweep_threshold(model, args.repeat)
        else:
            _print_gpu(name, r, device, args.prefill)
        del model
        if args.rss:
            r["server_peak_rss_mb"] = server_peak_rss_mb(name, args.threads, args.workdir, args.device)
            print(f"  server peak RSS after loading and one completion: {r['server_peak_rss_mb']:.0f} MB")
        results[name] = r
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, **results}, indent=2))


if __name__ == "__main__":
    main()
