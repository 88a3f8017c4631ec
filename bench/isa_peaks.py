"""The machine's physical bounds, for judging the kernels' figures against them.

Builds ``isa_peaks.cpp`` (g++, into a temporary directory) and prints, on 1 and on N threads: the
peak rate of fp32 FMA on 8 lanes (AVX2) and 16 lanes (AVX-512F), of ``vdpbf16ps`` (AVX512_BF16: bf16
pairs into fp32) and ``vpdpbusd`` (AVX512_VNNI: u8 x s8 quads into int32), each in G ops/s (a
multiply-add counts 2), and the read bandwidth from memory (1 GiB, 8 sequential runs per thread,
like the streaming kernels; best of 3). Loops the CPU lacks print "unsupported".

Then the prefill GEMM's fraction of a peak is 2 * T * N * K / time / peak, and decode's fraction of
bandwidth is the weights' bytes per step / step time / bandwidth.

    python bench/isa_peaks.py [--threads 2] [--json out.json]

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="the multi-threaded figures' thread count")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    counts = sorted({1, args.threads})
    figures = measure(counts)
    print(f"CPU: {cpu_model()}")
    for loop, rates in figures.items():
        unit = UNITS.get(loop, "G ops/s")
        cells = ", ".join(f"{k}: {'unsupported' if v is None else f'{v:.1f} {unit}'}" for k, v in rates.items())
        print(f"{loop:7s} {cells}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "peaks": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
