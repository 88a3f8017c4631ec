"""The machine's physical bounds, for judging the kernels' figures against them.

Builds ``isa_peaks.cpp`` (g++, into a temporary directory) and prints, on 1 and on N threads: the
peak rate of fp32 FMA on 8 lanes (AVX2) and 16 lanes (AVX-512F), of ``vdpbf16ps`` (AVX512_BF16: bf16
pairs into fp32) and ``vpdpbusd`` (AVX512_VNNI: u8 x s8 quads into int32), each in G ops/s (a
multiply-add counts 2), and the read bandwidth from memory (1 GiB, 8 sequential runs per thread,
like the streaming kernels; best of 3). Loops the CPU lacks print "unsupported".

``--gemm`` also times our prefill GEMM (granite_lsp's kernels) on one prefill's matmuls of the
real Granite-4.0-H-350M shape (T = 512 rows, lm_head left out as the prefill does), per weight
precision and per ISA level this CPU has, in alternation with medians of ``--reps``, and prints its
rate and its fraction of the peak of the instruction that level runs on (avx2: 8-lane FMA; avx512:
16-lane FMA; avx512_bf16 with bf16 weights: vdpbf16ps; avx512_vnni and above with int8 weights:
vpdpbusd), the peaks measured in the same run.
``--bench-json`` takes a ``granite-lsp bench --kernels --json`` file and prints each precision's
decode weight bytes per step (median step, after the prompt) as a fraction of the measured
bandwidth.

    python bench/isa_peaks.py [--threads 2] [--gemm] [--bench-json bench.json] [--json out.json]

On a shared machine the figures are lower bounds on the peaks: run it when the machine is quiet
(``uptime``), or several times and keep the highest.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("isa_peaks.cpp")
LOOPS = ["fma256", "fma512", "bf16", "vnni", "read"]
UNITS = {"read": "GB/s"}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure(threads: list[int]) -> dict[str, dict[str, float | None]]:
    """{loop: {"<n> threads": rate or None when the CPU lacks it}}."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "isa_peaks"
        subprocess.run(["g++", "-O2", "-std=c++17", "-pthread", str(SOURCE), "-o", str(exe)], check=True)
        out: dict[str, dict[str, float | None]] = {}
        for loop in LOOPS:
            for n in threads:
                text = subprocess.run([str(exe), str(n), loop], check=True, capture_output=True, text=True).stdout
                out.setdefault(loop, {})[f"{n} threads"] = None if text.strip() == "unsupported" else float(text)
        return out


# The peak each level's GEMM runs against: (level, precision) -> loop.
def _peak_loop(level: str, precision: str) -> str:
    if level == "avx512_bf16" and precision == "bfloat16":
        return "bf16"
    if level in ("avx512_vnni", "avx512_bf16") and precision == "int8":
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


def decode_fractions(bench: dict, bandwidth: float) -> dict[str, dict[str, float]]:
    """Each precision's weight bytes per decode step (median step after the prompt) over its time,
    against ``bandwidth`` (GB/s)."""
    out = {}
    for precision, r in bench.items():
        if precision == "machine" or "weight_mb" not in r:
            continue
        rate = r["weight_mb"] * 2**20 / (r["decode_ms"] / 1e3) / 1e9
        out[precision] = {"weights_gb_s": rate, "fraction": rate / bandwidth}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="the multi-threaded figures' thread count")
    ap.add_argument("--gemm", action="store_true", help="also time our prefill GEMM per precision and level")
    ap.add_argument("--precisions", default="bfloat16,float32,int8", help="for --gemm")
    ap.add_argument("--reps", type=int, default=5, help="for --gemm")
    ap.add_argument("--bench-json", type=Path, help="a bench --kernels --json file: decode's fraction of bandwidth")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    counts = sorted({1, args.threads})
    figures = measure(counts)
    report: dict[str, object] = {"cpu": cpu_model(), "peaks": figures}
    print(f"CPU: {cpu_model()}")
    for loop, rates in figures.items():
        unit = UNITS.get(loop, "G ops/s")
        cells = ", ".join(f"{k}: {'unsupported' if v is None else f'{v:.1f} {unit}'}" for k, v in rates.items())
        print(f"{loop:7s} {cells}")
    at = f"{args.threads} threads"
    if args.gemm:
        gemm = gemm_rates(args.threads, args.precisions.split(","), args.reps)
        report["gemm"] = gemm
        print(f"prefill GEMM (512 rows, one prefill's matmuls), {at}, medians of {args.reps}:")
        for precision, by_level in gemm.items():
            cells = []
            for level, rate in by_level.items():
                loop = _peak_loop(level, precision)
                peak = figures[loop][at]
                cells.append(f"{level} {rate:.1f} GF/s ({rate / peak:.0%} of {loop} {peak:.0f})" if peak else level)
            print(f"  {precision:9s} " + "; ".join(cells))
    if args.bench_json:
        bandwidth = figures["read"][at]
        assert bandwidth
        fractions = decode_fractions(json.loads(args.bench_json.read_text()), bandwidth)
        report["decode"] = fractions
        print(f"decode weight bytes per median step against {bandwidth:.1f} GB/s ({at}):")
        for precision, f in fractions.items():
            print(f"  {precision:9s} {f['weights_gb_s']:.1f} GB/s = {f['fraction']:.0%}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
