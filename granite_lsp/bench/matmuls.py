"""One decode token's matmuls on the real Granite-4.0-H-350M shapes: torch vs the AVX2 kernels.

Run ``python -m granite_lsp.bench.matmuls [--threads 2] [--rows 1] [--reps 9]``. Weight values do
not matter for speed, so weights are random. For fp32, bf16 and int8 it times every linear layer
of one token (lm_head included) with torch (``F.linear``; int8: torch's weight-only
``_weight_int8pack_mm``) and with ``PackedLinear``, alternating the two within each repetition so
both see the same machine load, and reports medians. "ceiling" is a plain streaming read of the
same number of bytes on the same threads (``read_probe``), measured in the same repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels import PackedLinear, available, build_error, read_probe
from ..runtime.config import HybridConfig
from .shape import decode_matmuls, real_config


def _median_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, running them in turn within every repetition."""
    for fn in fns.values():
        fn()  # warm-up: page faults, thread start
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _layers(mode: str, shapes: list[tuple[str, int, int]], gen: torch.Generator) -> list[PackedLinear]:
    layers = []
    for _, n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        layers.append(
            PackedLinear.from_weight(w.bfloat16() if mode == "bf16" else w, mode="int8" if mode == "int8" else "same")
        )
    return layers


def _time(
    layers: list[PackedLinear], xs: dict[int, torch.Tensor], args: argparse.Namespace, probe: torch.Tensor | None = None
) -> dict[str, float]:
    """Median seconds for one pass over ``layers`` with torch and with ours (and of reading ``probe``)."""

    def ours() -> None:
        for layer in layers:
            layer(xs[layer.in_features], threads=args.threads)

    def stock() -> None:
        for layer in layers:
            x = xs[layer.in_features]
            if layer.scale is not None:
                torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.scale)
            else:
                F.linear(x.to(layer.weight.dtype), layer.weight)

    fns: dict[str, Callable[[], object]] = {"torch": stock, "ours": ours}
    if probe is not None:
        fns["ceiling"] = lambda: read_probe(probe, args.threads)
    with torch.inference_mode():
        return _median_times(fns, args.reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="rows of x per matmul (1 = plain decode)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--modes", default="fp32,bf16,int8")
    ap.add_argument("--detail", action="store_true", help="also time each kind of layer on its own")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not available():
        raise SystemExit(f"extension unavailable: {build_error()}")
    print(f"extension ready in {time.perf_counter() - t0:.1f} s; threads={args.threads} rows={args.rows}")

    shapes = decode_matmuls(HybridConfig.from_dict(real_config()))
    xs = {k: torch.randn(args.rows, k) for k in {k for _, _, k in shapes}}
    gen = torch.Generator().manual_seed(0)
    probe_buf = torch.ones(256 << 18)  # 256 MB
    table = [
        f"{'':5} {'torch ms':>9} {'tok/s':>6} {'GB/s':>5} | {'ours ms':>8} {'tok/s':>6} {'GB/s':>5} |"
        f" {'ours/torch':>10} | {'ceiling GB/s':>12} {'ours/ceil':>9}"
    ]
    for mode in args.modes.split(","):
        layers = _layers(mode, shapes, gen)
        nbytes = sum(layer.nbytes for layer in layers)
        print(f"{mode}: {len(layers)} matmuls, {nbytes / 1e9:.2f} GB of weights per token", flush=True)
        t = _time(layers, xs, args, probe_buf)
        ceiling = probe_buf.nbytes / t["ceiling"] / 1e9
        cols = [f"{t[k] * 1e3:9.1f} {1 / t[k]:6.1f} {nbytes / t[k] / 1e9:5.1f}" for k in ("torch", "ours")]
        table.append(
            f"{mode:5} {cols[0]} |{cols[1]} | {t['torch'] / t['ours']:9.2f}x |"
            f" {ceiling:12.1f} {nbytes / t['ours'] / 1e9 / ceiling:9.2f}"
        )
        if args.detail:
            for name in dict.fromkeys(name for name, _, _ in shapes):
                group = [layer for layer, (n, _, _) in zip(layers, shapes, strict=True) if n == name]
                gb = sum(layer.nbytes for layer in group) / 1e9
                gt = _time(group, xs, args)
                print(
                    f"  {name:18} x{len(group):<3} torch {gb / gt['torch']:5.1f} GB/s  ours {gb / gt['ours']:5.1f} GB/s"
                )
        del layers
    print("\n".join(table))


if __name__ == "__main__":
    main()
