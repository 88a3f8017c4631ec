"""What decoding alternative candidates costs against a plain decode step, on the real shape.

    .venv/bin/python bench/candidates_cost.py [--precisions bfloat16,int8] [--threads 2] [--depth 512]

Random weights of Granite-4.0-H-350M's shape (speed does not depend on their values). After ``depth``
prompt tokens, in alternating rounds (same machine state for every side), it times:
- ``step``: one plain decode step of one sequence (the one-call step where the kernels have it);
- ``rows R``: one batched step of R sequences (runtime/rows.py: projections and MLPs on all R rows at
  once, the Mamba mix and attention per row), what a request for R candidates decodes per token;
- ``fork``: the copy of the state each alternative starts from (StateCache.branch: rows.fork_row with
  room for 64 tokens), once per alternative and request.
``rows R / step`` is the time per token of a request for several candidates over a single one's;
``R x step / rows R`` what batching saves against decoding the R sequences one after the other.
Medians over ``--rounds``.
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

from granite_lsp.bench.llama_baseline import settle  # noqa: E402
from granite_lsp.bench.shape import PRECISIONS, real_config  # noqa: E402
from granite_lsp.runtime import HybridModel  # noqa: E402
from granite_lsp.runtime.matmul import small_ops_single_threaded  # noqa: E402
from granite_lsp.runtime.rows import fork_row, step_rows  # noqa: E402


def measure(model: HybridModel, depth: int, rows: list[int], rounds: int) -> dict[str, object]:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (depth + 16,), generator=torch.Generator().manual_seed(0))
    state = model.new_state(depth + 32)
    model.forward(ids[:depth], state)
    snap = state.snapshot()
    forks = [state.fork() for _ in range(max(rows))]
    fork_snaps = [f.snapshot() for f in forks]
    step: list[float] = []
    fork: list[float] = []
    batched: dict[int, list[float]] = {r: [] for r in rows}
    for r in range(rounds + 1):  # round 0 warms up
        state.restore(snap)
        settle()
        t0 = time.perf_counter()
        model.forward(ids[depth : depth + 1], state)
        t1 = time.perf_counter()
        state.restore(snap)
        with small_ops_single_threaded():  # as StateCache.branch
            copy = fork_row(state, 64)
        t2 = time.perf_counter()
        del copy
        if r:
            step.append(t1 - t0)
            fork.append(t2 - t1)
        for n in rows:
            for f, s in zip(forks[:n], fork_snaps[:n], strict=True):
                f.restore(s)
            settle()
            t0 = time.perf_counter()
            step_rows(model, ids[depth : depth + n].tolist(), forks[:n])
            if r:
                batched[n].append(time.perf_counter() - t0)
    med = statistics.median
    s = med(step)
    out: dict[str, object] = {"depth": depth, "rounds": rounds, "step_ms": s * 1e3, "fork_ms": med(fork) * 1e3}
    for n in rows:
        b = med(batched[n])
        out[f"rows{n}"] = {"ms": b * 1e3, "over_step": b / s, "saved_vs_one_by_one": n * s / b}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precisions", default="bfloat16", help=f"comma-separated: {', '.join(PRECISIONS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--rows", default="1,2,3", help="rows R of a batched step")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [int(n) for n in args.rows.split(",")]
    print(f"candidates cost, real shape (random weights), threads {args.threads}, depth {args.depth}, medians")
    results = {}
    for name in args.precisions.split(","):
        dtype, quantize = PRECISIONS[name]
        model = HybridModel.from_config(real_config(), dtype=dtype, quantize=quantize)
        r = measure(model, args.depth, rows, args.rounds)
        results[name] = r
        print(f"{name}: step {r['step_ms']:.2f} ms, fork {r['fork_ms']:.2f} ms")
        for n in rows:
            f = r[f"rows{n}"]
            assert isinstance(f, dict)
            print(
                f"  rows={n:2d}: {f['ms']:.2f} ms ({f['over_step']:.2f}x step;"
                f" {f['saved_vs_one_by_one']:.2f}x faster than {n} steps one by one)"
            )
        del model
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
