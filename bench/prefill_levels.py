"""A 512-token prefill on the real Granite-4.0-H-350M shape (random weights) at several ISA levels,
alternating in one process, and where its time goes.

On the shared 2-core machine wall-clock timings swing several-fold with the load; the CPU time of
the one thread that runs everything (``--threads 1``: the kernels' pool then works in the caller)
swings far less, so that is what it reports by default: the median of ``--reps`` rounds per level
(and their range, the noise), the levels taking turns each round, and each level's ratio to the first
one named. ``--ops`` also splits each level's time by op family (our kernels' ops, the prefill attention among them, and
torch's SDPA where a prefill still takes it, timed around each call; the rest is Python and torch glue).

    python bench/prefill_levels.py --precision int8 --levels avx2,avx512,avx512_vnni,amx [--reps 3] [--ops]

Comparing builds (e.g. before and after a kernel change): run it from each checkout in turn
(``PYTHONPATH=<checkout>``), alternating, with one level.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from granite_lsp.bench.shape import real_config
from granite_lsp.kernels import isa
from granite_lsp.kernels import ops as kernel_ops
from granite_lsp.runtime.config import HybridConfig
from granite_lsp.runtime.model import HybridModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}
KERNEL_OPS = ("linear", "mamba_mixer", "attention_prefill", "swiglu", "add_rms_norm", "rms_norm")


def _timed(fn: Callable[..., Any], label: str, acc: dict[str, float], clock: Callable[[], float]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label] += clock() - t0

    return wrapper


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--levels", default="", help="comma-separated ISA levels (default: the level in use)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="> 1 reports wall-clock time instead of CPU time")
    ap.add_argument("--ops", action="store_true", help="split each level's time by op family")
    args = ap.parse_args(argv)
    levels = args.levels.split(",") if args.levels else [str(isa.level())]
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    acc: collections.defaultdict[str, float] = collections.defaultdict(float)
    if args.ops:
        for name in KERNEL_OPS:
            setattr(kernel_ops.CpuKernels, name, _timed(getattr(kernel_ops.CpuKernels, name), name, acc, clock))
        # runtime/layers.py calls it as F.scaled_dot_product_attention: patched on the module
        F.scaled_dot_product_attention = _timed(F.scaled_dot_product_attention, "attention (torch sdpa)", acc, clock)
    cfg = HybridConfig.from_dict(real_config())
    quantize = "int8" if args.precision == "int8" else None
    model = HybridModel.from_config(cfg, dtype=DTYPES[args.precision], quantize=quantize)
    ids = torch.randint(0, cfg.vocab_size, (args.tokens,))
    times: dict[str, list[float]] = {level: [] for level in levels}
    parts: dict[str, list[dict[str, float]]] = {level: [] for level in levels}
    for rep in range(args.reps + 1):  # the first round warms up
        for level in levels:
            with isa.at_level(level):
                state = model.new_state(args.tokens + 8)
                acc.clear()
                t0 = clock()
                model.forward(ids, state)
                elapsed = clock() - t0
            if rep:
                times[level].append(elapsed)
                parts[level].append(dict(acc))
    kind = "CPU time, 1 thread" if args.threads == 1 else f"wall time, {args.threads} threads"
    what = f"{args.precision} prefill of {args.tokens} tokens, {kind}, medians of {args.reps}"
    print(f"CPU: {isa.cpu_report()['cpu']}; {what}")
    base = statistics.median(times[levels[0]])
    for level in levels:
        m = statistics.median(times[level])
        spread = f"{min(times[level]) * 1e3:.0f}-{max(times[level]) * 1e3:.0f}"
        print(f"  {level:12s} {m * 1e3:8.0f} ms ({spread})  {args.tokens / m:6.0f} tok/s  {base / m:5.2f}x {levels[0]}")
    for level in levels if args.ops else []:
        total, runs = statistics.median(times[level]), parts[level]
        print(f"  where {level}'s time goes (median, range):")
        for name in sorted(runs[0], key=lambda k: -runs[0][k]):
            values = [p.get(name, 0.0) for p in runs]
            v, lo, hi = statistics.median(values), min(values), max(values)
            print(f"    {name:24s} {v * 1e3:8.1f} ms  {v / total:6.1%}  ({lo * 1e3:.1f}-{hi * 1e3:.1f})")
        rest = total - statistics.median(sum(p.values()) for p in runs)
        print(f"    {'the rest (Python, glue)':24s} {rest * 1e3:8.1f} ms  {rest / total:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
