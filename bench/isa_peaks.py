"""The machine's physical bounds, for judging the kernels' figures against them.

Builds ``isa_peaks.cpp`` (g++, into a temporary directory) and prints, on 1 and on N threads: the
peak rate of fp32 FMA on 8 lanes (AVX2) and 16 lanes (AVX-512F), of ``vdpbf16ps`` (AVX512_BF16: bf16
pairs into fp32), ``vpdpbusd`` (AVX512_VNNI: u8 x s8 quads into int32) and AMX's ``tdpbf16ps`` and
``tdpbssd`` (tile products, bf16 pairs and s8 quads; ``amx_bf16_loads`` the bf16 one with its
four operand tiles loaded again from L2 before each four products, as a tile GEMM's 2 x 2 block
does), each in G ops/s (a multiply-add counts 2), and the read bandwidth from memory (512 MiB per
thread; the best of three access patterns, 3 rounds: isa_peaks.cpp says which). Loops the CPU lacks print "unsupported".

``--gemm`` also times our prefill GEMM (granite_lsp's kernels) on one prefill's matmuls of the
real Granite-4.0-H-350M shape (T = 512 rows, lm_head left out as the prefill does), per weight
precision and per ISA level this CPU has, in alternation with medians of ``--reps``, and prints its
rate and its fraction of the peak of the instruction that level runs on (avx2: 8-lane FMA; avx512:
16-lane FMA; avx512_bf16 with bf16 weights: vdpbf16ps; avx512_vnni and avx512_bf16 with int8 weights:
vpdpbusd; amx: tdpbf16ps / tdpbssd for bf16 / int8 weights), the peaks measured in the same run.
``--bench-json`` takes a ``granite-lsp bench --kernels --json`` file and prints, per precision, the
two bounds issue 14's closing note asks for, against the peaks this run measured at the bench's
thread count (its JSON's ``machine.threads``): the prefill GEMM's rate (one prefill's matmuls on
the bench's prefill rows, lm_head on the last row: the bench's "matmuls alone", and the same FLOPs
over the whole prefill's median time) as a fraction of the peak of the instruction the bench's ISA
level runs it on; and decode's bound, the weight bytes one step reads over the measured read
bandwidth, as a fraction of the median step at the bench's depth. That bandwidth is measured re-reading
a buffer of the step's size (``read <precision>``): where the L3 is large (480 MB on the Xeon of
2026-12-06) it holds part of the weights from one step to the next, and memory's bandwidth alone
(``read``, also printed) would make a "bound" the steps beat.

    granite-lsp bench --kernels --prefill 512 --decode 32 --repeat 3 --json bench.json
    python bench/isa_peaks.py --bench-json bench.json [--threads 2] [--gemm] [--json out.json]

On a shared machine the figures are lower bounds on the peaks: run it when the machine is quiet
(``uptime``), right after the bench, or several times and keep the highest peaks.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("isa_peaks.cpp")
LOOPS = ["fma256", "fma512", "bf16", "vnni", "amx_bf16", "amx_int8", "amx_bf16_loads", "read"]
UNITS = {"read": "GB/s"}  # and every "read <precision>" line


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure(threads: list[int], working_sets: dict[str, int] | None = None) -> dict[str, dict[str, float | None]]:
    """{loop: {"<n> threads": rate or None when the CPU lacks it}}. ``working_sets`` (name -> bytes) adds
    a ``read <name>`` entry per set: the bandwidth of re-reading that many bytes (isa_peaks.cpp's read with
    a size), measured on the largest thread count only."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "isa_peaks"
        subprocess.run(["g++", "-O2", "-std=c++17", "-pthread", str(SOURCE), "-o", str(exe)], check=True)

        def run(*args: str) -> float | None:
            text = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout
            return None if text.strip() == "unsupported" else float(text)

        out: dict[str, dict[str, float | None]] = {}
        for loop in LOOPS:
            for n in threads:
                out.setdefault(loop, {})[f"{n} threads"] = run(str(n), loop)
        for name, nbytes in (working_sets or {}).items():
            out[f"read {name}"] = {f"{max(threads)} threads": run(str(max(threads)), "read", str(nbytes))}
        return out


# The peak each level's GEMM runs against: (level, precision) -> loop.
def _peak_loop(level: str, precision: str) -> str:
    if level == "amx" and precision in ("bfloat16", "int8"):
        return "amx_bf16" if precision == "bfloat16" else "amx_int8"
    if level in ("avx512_bf16", "amx") and precision == "bfloat16":
        return "bf16"
    if level in ("avx512_vnni", "avx512_bf16", "amx") and precision == "int8":
        return "vnni"
    return "fma256" if level == "avx2" else "fma512"


def gemm_rates(threads: int, precisions: list[str], reps: int, rows: int = 512) -> dict[str, dict[str, float]]:
    """{precision: {level: G flop/s}} of our GEMM on one prefill's matmuls, medians of ``reps``
    rounds that run every level in turn."""
    import statistics
    import time

    import torch

    from granite_lsp.bench.shape import decode_matmuls, real_config
    from granite_lsp.kernels import PackedLinear, isa
    from granite_lsp.runtime.config import HybridConfig

    shapes = [(n, k) for name, n, k in decode_matmuls(HybridConfig.from_dict(real_config())) if name != "lm_head"]
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    flops = sum(2 * rows * n * k * c for (n, k), c in counts.items())
    out: dict[str, dict[str, float]] = {}
    for precision in precisions:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}
        layers = {
            (n, k): PackedLinear.from_weight(
                (torch.randn(n, k) * 0.02).to(dtype[precision]), mode="int8" if precision == "int8" else "same"
            )
            for (n, k) in counts
        }
        xs = {k: torch.randn(rows, k) for (_, k) in counts}
        times: dict[str, list[float]] = {level: [] for level in isa.levels()}
        for rep in range(reps + 1):
            for level in times:
                with isa.at_level(level):
                    total = 0.0
                    for (n, k), layer in layers.items():
                        t0 = time.perf_counter()
                        layer.product(xs[k], threads)
                        total += (time.perf_counter() - t0) * counts[(n, k)]
                if rep:  # the first round is warm-up
                    times[level].append(total)
        out[precision] = {level: flops / statistics.median(v) / 1e9 for level, v in times.items()}
    return out


def matmul_flops(rows: int) -> int:
    """FLOPs of one prefill's matmuls as the bench times them alone (``time_linears``): every
    matrix on ``rows`` rows, lm_head on the last row only; a multiply-add counts 2."""
    from granite_lsp.bench.shape import decode_matmuls, real_config
    from granite_lsp.runtime.config import HybridConfig

    shapes = decode_matmuls(HybridConfig.from_dict(real_config()))
    return sum(2 * (1 if name == "lm_head" else rows) * n * k for name, n, k in shapes)


def bench_bounds(
    bench: dict[str, Any], peaks: dict[str, dict[str, float | None]], threads: int
) -> dict[str, dict[str, Any]]:
    """Per precision of a ``bench --kernels`` JSON: the prefill GEMM's fraction of the peak of the
    instruction the bench's level runs it on, and decode's bandwidth bound's fraction of its median
    step, against ``peaks`` at the bench's thread count (``threads``)."""
    machine = bench.get("machine") or {}
    level, at = machine.get("isa_level"), f"{threads} threads"
    if level is None:
        raise SystemExit("the bench JSON names no ISA level (machine.isa_level): rerun granite-lsp bench --kernels")
    if level not in ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"):
        raise SystemExit(f"the bench ran without the kernels ({level}): no GEMM to hold against a peak")
    memory = peaks["read"].get(at)
    out: dict[str, dict[str, Any]] = {}
    for precision, r in bench.items():
        if precision == "machine" or "weight_mb" not in r:
            continue
        # the bandwidth of re-reading a working set of the step's size where it was measured (a large L3
        # holds part of it from one step to the next, as it holds part of the weights), else memory's
        bandwidth = (peaks.get(f"read {precision}") or {}).get(at) or memory
        rows = round(r["prefill_tok_s"] * r["prefill_s"])  # the prefill's length, whatever the decode depth
        flops = matmul_flops(rows)
        loop = _peak_loop(level, precision)
        peak = peaks[loop].get(at)
        gemm, whole = flops / r["prefill_linear_s"] / 1e9, flops / r["prefill_s"] / 1e9
        step_bytes = r["weight_mb"] * 2**20
        bound_ms = step_bytes / (bandwidth * 1e9) * 1e3 if bandwidth else None
        out[precision] = {
            "level": level,
            "prefill_rows": rows,
            "peak_loop": loop,
            "peak_g_ops_s": peak,
            "gemm_g_ops_s": gemm,
            "gemm_fraction": gemm / peak if peak else None,
            "prefill_g_ops_s": whole,
            "prefill_fraction": whole / peak if peak else None,
            "decode_depth": r.get("decode_depth"),
            "decode_bytes_mb": step_bytes / 1e6,
            "read_gb_s": bandwidth,
            "memory_read_gb_s": memory,
            "decode_bound_ms": bound_ms,
            "decode_ms": r["decode_ms"],
            "decode_fraction": bound_ms / r["decode_ms"] if bound_ms else None,
        }
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _print_bounds(bounds: dict[str, dict[str, Any]], at: str) -> None:
    for precision, b in bounds.items():
        peak = "unsupported" if b["peak_g_ops_s"] is None else f"{b['peak_g_ops_s']:.1f}"
        bound = "n/a" if b["decode_bound_ms"] is None else f"{b['decode_bound_ms']:.1f} ms"
        print(
            f"  {precision:9s} prefill {b['prefill_rows']} rows at {b['level']}: GEMM alone {b['gemm_g_ops_s']:.1f}"
            f" = {_pct(b['gemm_fraction'])} of {b['peak_loop']} {peak} ({at}), whole prefill's matmul rate"
            f" {b['prefill_g_ops_s']:.1f} = {_pct(b['prefill_fraction'])}\n"
            f"  {'':9s} decode at depth {b['decode_depth']}: {b['decode_bytes_mb']:.0f} MB of weights per step"
            f" / {b['read_gb_s']:.1f} GB/s (re-reading that many bytes; memory alone"
            f" {b['memory_read_gb_s']:.1f}) = {bound} bound, median step {b['decode_ms']:.1f} ms:"
            f" {_pct(b['decode_fraction'])} of the bandwidth bound"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="the multi-threaded figures' thread count")
    ap.add_argument("--gemm", action="store_true", help="also time our prefill GEMM per precision and level")
    ap.add_argument("--precisions", default="bfloat16,float32,int8", help="for --gemm")
    ap.add_argument("--reps", type=int, default=5, help="for --gemm")
    ap.add_argument(
        "--bench-json",
        type=Path,
        help="a bench --kernels --json file: its prefill GEMM against the peaks, decode against bandwidth",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    bench = json.loads(args.bench_json.read_text()) if args.bench_json else None
    bench_threads = int((bench or {}).get("machine", {}).get("threads", args.threads))
    sets = {p: int(r["weight_mb"] * 2**20) for p, r in (bench or {}).items() if p != "machine" and "weight_mb" in r}
    figures = measure(sorted({1, args.threads, bench_threads}), sets)
    report: dict[str, object] = {"cpu": cpu_model(), "peaks": figures}
    print(f"CPU: {cpu_model()}")
    for loop, rates in figures.items():
        unit = "GB/s" if loop.startswith("read") else UNITS.get(loop, "G ops/s")
        line = ", ".join(f"{k}: {'unsupported' if v is None else f'{v:.1f} {unit}'}" for k, v in rates.items())
        print(f"{loop:7s} {line}")
    at = f"{args.threads} threads"
    if args.gemm:
        gemm = gemm_rates(args.threads, args.precisions.split(","), args.reps)
        report["gemm"] = gemm
        print(f"prefill GEMM (512 rows, one prefill's matmuls), {at}, medians of {args.reps}:")
        for precision, by_level in gemm.items():
            cells = []
            for level, rate in by_level.items():
                peak_loop = _peak_loop(level, precision)
                peak = figures[peak_loop][at]
                cells.append(
                    f"{level} {rate:.1f} GF/s ({rate / peak:.0%} of {peak_loop} {peak:.0f})" if peak else level
                )
            print(f"  {precision:9s} " + "; ".join(cells))
    if bench is not None:
        bounds = bench_bounds(bench, figures, bench_threads)
        report["bounds"] = bounds
        print(f"{args.bench_json} against these peaks (G ops/s; a multiply-add counts 2):")
        _print_bounds(bounds, f"{bench_threads} threads")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
