"""Speed of the runtime on the real Granite-4.0-H-350M shape with random weights, per precision.

Run ``granite-lsp bench --kernels`` (or ``python -m granite_lsp.bench.microbench``). Speed does
not depend on weight values, so no checkpoint is needed. For each precision it prints decode and
prefill tokens/s and, measured in the same run, the model's matmuls alone (lm_head included):
through our kernels on the same packed weights, and through torch's own kernels on weights of
the same shapes and precision (``F.linear``; ``torch._weight_int8pack_mm`` for int8). Decode on
CPU is bound by streaming those weights from memory, so "decode step / matmuls alone" says how
much is left to gain outside them. ``--rss`` also starts the real server on a checkpoint
directory of that shape (written once, bf16 like Granite's) and reports its peak RSS after a
completion. ``--sweep`` times the scan chunk sizes and the recurrent/scan threshold that the
defaults in ``model.py`` were chosen from. The llama.cpp figures the issue set (llama-bench, 2
threads, on the 2-core AVX2 machine this was built on, another day) are printed beside ours; with
``--llama-cpp DIR`` llama.cpp also runs in this bench, alternating with ours round by round on
the same tokens, and each of our figures gets a ratio to its figure from the same rounds
(``llama_baseline.py``). ``--device cuda`` builds the model on the GPU instead (timings
synchronize the device; it says whether the Mamba layers ran mamba_ssm / causal_conv1d kernels or
the torch ops, see ``runtime/cuda_kernels.py``; no llama.cpp comparison there).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import PackedLinear
from ..runtime import cuda_kernels
from ..runtime.matmul import linear, matmul_threads, small_ops_single_threaded
from ..runtime.model import HybridModel
from ..runtime.ssm import ssm_chunked
from .llama_baseline import LlamaPeer, gguf_for, settle
from .rss import server_peak_rss_mb
from .shape import PRECISIONS, real_config


def _sync() -> None:
    """Wait for queued GPU work, so wall times cover it (a no-op in a CPU-only process)."""
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up: on a shared machine other load only
    ever adds time, so the minimum is the least noisy estimate of what the code costs."""
    fn()
    samples = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - t0)
    return min(samples)


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


def _time_prefill(
    model: HybridModel, ids: torch.Tensor, prefill: int, decode: int, repeat: int, peer: LlamaPeer | None
) -> tuple[float, list[float]]:
    """Our best prefill time, and llama.cpp's prefill times (when given). Each round times ours,
    then llama.cpp's on the same tokens; the first round is warm-up for both."""
    id_list = ids.tolist()
    ours_pf: list[float] = []
    peer_pf: list[float] = []
    for r in range(repeat + 1):
        if peer is not None:
            settle()
        _sync()
        t0 = time.perf_counter()
        model.forward(ids[:prefill], model.new_state(prefill + decode))
        _sync()
        if r:
            ours_pf.append(time.perf_counter() - t0)
        if peer is not None:
            t = peer.prefill(id_list[:prefill])
            if r:
                peer_pf.append(t)
    return min(ours_pf), peer_pf


def _time_decode(
    model: HybridModel, ids: torch.Tensor, prefill: int, decode: int, repeat: int, peer: LlamaPeer | None
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Seconds of: decode steps, the same steps layer by layer, the matmuls alone, llama.cpp's steps.

    Decode steps and the matmuls alone are timed in alternation, so that both see the same
    machine (a shared 2-core box drifts by 30% within a minute); callers keep the minimum of each.
    The same steps layer by layer (``fused_step`` off) are timed in the same rounds: what the
    one-call step (kernels/step.cpp) saves, where it applies (not on GPU, nor without the kernels).
    """
    id_list = ids.tolist()
    state = model.new_state(prefill + decode + 1)
    model.forward(ids[:prefill], state)
    snap = state.snapshot()
    steps: list[float] = []
    layered: list[float] = []
    lin1: list[float] = []
    peer_steps: list[float] = []
    fused_step = model.fused_step
    paths = ((True, steps), (False, layered)) if model._one_call_step_applies() else ((fused_step, steps),)
    for r in range(repeat + 1):
        for one_call, out in paths:
            model.fused_step = one_call
            state.restore(snap)
            if peer is not None:
                settle()
            for i in range(decode):
                _sync()
                t0 = time.perf_counter()
                model.forward(ids[prefill + i : prefill + i + 1], state)
                _sync()
                if r or i:  # first step of the first round is warm-up
                    out.append(time.perf_counter() - t0)
        with small_ops_single_threaded():
            lin1.append(time_linears(model, 1, 2, _kernel_linear))  # the runtime's own matmuls
        if peer is not None:
            got = peer.decode(id_list[:prefill], id_list[prefill : prefill + decode])
            peer_steps += got if r else got[1:]  # the same warm-up step as ours left out
    model.fused_step = fused_step
    return steps, layered, lin1, peer_steps


def bench_model(
    model: HybridModel, prefill: int, decode: int, repeat: int, peer: LlamaPeer | None = None
) -> dict[str, Any]:
    """Figures of one model (floats; ``decode_layered_ms`` None where there is no one-call step)."""
    ids = torch.randint(0, model.config.vocab_size, (prefill + decode,))
    t_prefill, peer_pf = _time_prefill(model, ids, prefill, decode, repeat, peer)
    steps, layered, lin1, peer_steps = _time_decode(model, ids, prefill, decode, repeat, peer)
    t_step = min(steps)
    t_ours1 = min(lin1)
    with small_ops_single_threaded():
        t_oursp = time_linears(model, prefill, repeat, _kernel_linear)
    t_torch1 = time_linears(model, 1, max(5, repeat * 3))
    return {
        "prefill_tok_s": prefill / t_prefill,
        "prefill_s": t_prefill,
        "prefill_linear_s": t_oursp,
        "decode_tok_s": 1.0 / t_step,
        "decode_ms": t_step * 1e3,
        "decode_median_ms": statistics.median(steps) * 1e3,
        "decode_layered_ms": min(layered) * 1e3 if layered else None,
        "linear_ms": t_ours1 * 1e3,
        "torch_linear_ms": t_torch1 * 1e3,
        **(
            {
                "llama_prefill_tok_s": prefill / min(peer_pf),
                "llama_decode_tok_s": 1.0 / min(peer_steps),
                "llama_decode_median_ms": statistics.median(peer_steps) * 1e3,
            }
            if peer is not None
            else {}
        ),
    }


def _scan_from_zero(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int
) -> None:
    with torch.inference_mode():
        ssm_chunked(x, dt, A, B, C, x.new_zeros(x.shape[1], x.shape[2], B.shape[2]), chunk_size)


def sweep_chunk_sizes(model: HybridModel, repeat: int) -> None:
    """The chunk size only changes the SSD scan, so time the scan alone (x28 Mamba layers)."""
    cfg = model.config
    H, P, N, G = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state, cfg.mamba_n_groups
    n_layers = len(cfg.mamba_layers)
    A = -torch.arange(1, H + 1, dtype=torch.float32)
    print(f"  scan alone x{n_layers} layers (seconds) by chunk size:")
    for T in (256, 512, 1024, 2048):
        x, B, C = torch.randn(T, H, P), torch.randn(T, G, N), torch.randn(T, G, N)
        dt = F.softplus(torch.randn(T, H))
        row = []
        for cs in (32, 64, 128, 256):
            scan = functools.partial(_scan_from_zero, x, dt, A, B, C, cs)
            row.append(f"{cs}: {_time(scan, repeat) * n_layers:.3f}")
        print(f"    T={T:5d}  " + "  ".join(row))


def sweep_threshold(model: HybridModel, repeat: int) -> None:
    """Continuing by T tokens: per-token recurrence vs chunked scan, whole model."""
    saved = model.recurrent_max
    print("  continuation of T tokens after 256 (ms): recurrent vs scan")
    ids = torch.randint(0, model.config.vocab_size, (256 + 32,))
    state = model.new_state(512)
    model.forward(ids[:256], state)
    snap = state.snapshot()
    for T in (1, 2, 4, 6, 8, 12, 16, 24, 32):
        res = []
        for rmax in (10**9, 0):
            model.recurrent_max = rmax

            def cont(T: int = T) -> None:
                state.restore(snap)
                model.forward(ids[256 : 256 + T], state)

            res.append(_time(cont, repeat) * 1e3)
        print(f"    T={T:3d}  recurrent {res[0]:7.1f}  scan {res[1]:7.1f}")
    model.recurrent_max = saved


# llama-bench -t 2 on the real shape, this machine kind (see issue #4): tg128 / pp512 tokens/s.
LLAMA_CPP = {
    "float32": ("F32", 13.8, 130.0),
    "bfloat16": ("F16", 26.4, 215.0),
    "float16": ("F16", 26.4, 215.0),
    "int8": ("Q8_0", 35.9, 161.0),
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


def _print_cpu(name: str, r: dict[str, Any], packed: bool, prefill: int, with_peer: bool) -> None:
    """One precision's CPU figures, beside the issue's llama-bench figures (and the same rounds')."""
    ref_name, ref_tg, ref_pp = LLAMA_CPP[name]
    layered = r["decode_layered_ms"]
    print(
        f"\n{name} (weights {r['weight_mb']:.0f} MB, {'packed kernels' if packed else 'torch matmuls'})\n"
        f"  decode  {r['decode_tok_s']:6.2f} tok/s  "
        f"({r['decode_ms']:.1f} ms/step, median {r['decode_median_ms']:.1f})"
        f"   llama.cpp {ref_name} tg128 {ref_tg}: x{r['decode_tok_s'] / ref_tg:.2f}\n"
        + (
            f"  decode step layer by layer (no one-call step) {layered:.1f} ms:"
            f" x{layered / r['decode_ms']:.2f} the one-call step\n"
            if layered
            else ""
        )
        + f"  prefill {r['prefill_tok_s']:6.1f} tok/s  ({r['prefill_s']:.2f} s)"
        f"   llama.cpp {ref_name} pp512 {ref_pp}: x{r['prefill_tok_s'] / ref_pp:.2f}\n"
        f"  matmuls alone, 1 token: ours {r['linear_ms']:.1f} ms, torch {r['torch_linear_ms']:.1f} ms"
        f"  ->  decode step / ours {r['decode_ms'] / r['linear_ms']:.2f}x,"
        f" / torch {r['decode_ms'] / r['torch_linear_ms']:.2f}x\n"
        f"  matmuls alone, {prefill} tokens: {r['prefill_linear_s']:.2f} s"
        f"  ->  prefill / matmuls {r['prefill_s'] / r['prefill_linear_s']:.2f}x"
    )
    if with_peer:
        tg, pp = r["llama_decode_tok_s"], r["llama_prefill_tok_s"]
        print(
            f"  llama.cpp {ref_name} in the same rounds: decode {tg:6.2f} tok/s"
            f" (median {r['llama_decode_median_ms']:.1f} ms/step): ours x{r['decode_tok_s'] / tg:.2f};"
            f"  prefill {pp:6.1f} tok/s: ours x{r['prefill_tok_s'] / pp:.2f}"
        )


def _print_gpu(name: str, r: dict[str, Any], device: torch.device, prefill: int) -> None:
    print(
        f"\n{name} on {device} (weights {r['weight_mb']:.0f} MB)\n"
        f"  decode  {r['decode_tok_s']:7.1f} tok/s  "
        f"({r['decode_ms']:.2f} ms/step, median {r['decode_median_ms']:.2f})\n"
        f"  prefill {r['prefill_tok_s']:7.0f} tok/s  ({r['prefill_s'] * 1e3:.1f} ms)\n"
        f"  matmuls alone, 1 token: {r['linear_ms']:.2f} ms (torch F.linear {r['torch_linear_ms']:.2f} ms);"
        f" {prefill} tokens: {r['prefill_linear_s'] * 1e3:.1f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    cfg = real_config()
    where = f"threads {torch.get_num_threads()}"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, Mamba layers: {cuda_kernels.describe(device)}"
    print(
        f"torch {torch.__version__}, {where}, "
        f"hidden {cfg.get('hidden_size')} x {cfg.get('num_hidden_layers')} layers, "
        f"decode after {args.prefill} tokens, prefill of {args.prefill}"
    )
    results: dict[str, dict[str, Any]] = {}
    for name in args.precisions.split(","):
        dtype, quantize = PRECISIONS[name]
        # llama.cpp's file first: writing it holds its weights in memory, which the model's
        # would otherwise join
        gguf = gguf_for(args.llama_cpp, cfg, LLAMA_CPP[name][0].lower()) if args.llama_cpp else None
        model = HybridModel.from_config(cfg, dtype=dtype, quantize=quantize, device=device)
        peer = None
        if gguf is not None:
            ctx = args.prefill + args.decode + 8
            peer = LlamaPeer(args.llama_cpp_python, gguf, args.threads, ctx, model.config.vocab_size)
        try:
            r = bench_model(model, args.prefill, args.decode, args.repeat, peer)
        finally:
            if peer is not None:
                peer.close()
        r["weight_mb"] = model.weight_bytes() / 2**20
        if on_cpu:
            _print_cpu(name, r, model.packed, args.prefill, peer is not None)
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
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
