"""What handing the heap's free pages back (``memory.release``, glibc malloc_trim) costs and gives, on the real shape.

    .venv/bin/python bench/trim_cost.py [--precision bfloat16] [--threads 2] [--depth 1500] [--tokens 300]

Random weights of Granite-4.0-H-350M's shape. A state cache is brought to ``depth`` tokens; each round then
runs, from that checkpoint, the work of a request after a cursor jump: ``--tokens`` new prompt tokens and 16
decode steps. Per round: ``release()`` (timed, and the RSS it gave back: what the previous round's work
left in the heap), the work (timed: a request right after a trim, which faults its pages back in), the same
work again (timed: a request after one that did not trim). The ratio of the two works in each round, and
medians over ``--rounds``: timings on a shared machine are noisy, the same-round ratio compares.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from granite_lsp import memory  # noqa: E402
from granite_lsp.bench.shape import PRECISIONS, real_config  # noqa: E402
from granite_lsp.runtime import HybridModel  # noqa: E402
from granite_lsp.state_cache import StateCache  # noqa: E402


def measure(model: HybridModel, depth: int, tokens: int, rounds: int) -> dict[str, object]:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (depth + 2 * (rounds + 1) * tokens,), generator=gen).tolist()
    cache = StateCache(model, max_bytes=4 << 30, interval=0)
    cache.prefill("doc", ids[:depth])
    base = [c for c in cache.checkpoints if c.pos == depth][0]
    fresh = iter(range(depth, len(ids), tokens))

    def work() -> float:
        """A request after a jump: restore, ``tokens`` new tokens, 16 decode steps; seconds."""
        cache.checkpoints = [base]
        a = next(fresh)
        t0 = time.perf_counter()
        cache.prefill("doc", ids[:depth] + ids[a : a + tokens])
        for _ in range(16):
            cache.step(5)
        return time.perf_counter() - t0

    out: dict[str, list[float]] = {"trim_ms": [], "given_back_mb": [], "after_trim_ms": [], "after_keep_ms": []}
    for r in range(rounds + 1):  # round 0 warms up
        before = memory.resident().get("rss", 0.0)
        t0 = time.perf_counter()
        memory.release()
        trim = time.perf_counter() - t0
        given = before - memory.resident().get("rss", 0.0)
        after_trim = work()
        after_keep = work()
        if r:
            out["trim_ms"].append(trim * 1e3)
            out["given_back_mb"].append(given)
            out["after_trim_ms"].append(after_trim * 1e3)
            out["after_keep_ms"].append(after_keep * 1e3)
    ratios = [a / b for a, b in zip(out["after_trim_ms"], out["after_keep_ms"], strict=True)]
    return {
        "depth": depth,
        "tokens": tokens,
        "rounds": rounds,
        "median": {k: statistics.median(v) for k, v in out.items()},
        "ratio_after_trim_over_after_keep": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },  # fmt: skip
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", default="bfloat16", help=", ".join(PRECISIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=1500)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype, quantize = PRECISIONS[args.precision]
    model = HybridModel.from_config(real_config(), dtype=dtype, quantize=quantize)
    r = measure(model, args.depth, args.tokens, args.rounds)
    med, ratio = r["median"], r["ratio_after_trim_over_after_keep"]
    assert isinstance(med, dict) and isinstance(ratio, dict)
    print(f"malloc_trim after a request, real shape (random weights), {args.precision}, threads {args.threads},")
    print(f"depth {args.depth}, {args.tokens} new tokens + 16 decode steps, medians of {args.rounds} rounds (noisy)")
    print(f"  release(): {med['trim_ms']:.1f} ms, gave back {med['given_back_mb']:.1f} MB")
    print(f"  request after a trim {med['after_trim_ms']:.0f} ms, after none {med['after_keep_ms']:.0f} ms")
    print(
        f"  same-round ratio after trim / after none: median {ratio['median']:.3f}"
        f" (min {ratio['min']:.3f}, max {ratio['max']:.3f})"
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
