"""What speculative decoding's verify costs against a plain decode step, on the real shape.

    .venv/bin/python bench/verify_cost.py [--precisions bfloat16,int8] [--threads 2] [--depth 512] [--layered]

Random weights of Granite-4.0-H-350M's shape (speed does not depend on their values). After ``depth``
prompt tokens, in alternating rounds (same machine state for every side), it times:
- ``step``: two plain decode steps one after the other (1 row each; the one-call step where the kernels
  have it);
- ``verify k``: one journaled forward of 1 + k rows (the fed token and k drafts), all logits (the
  one-call step of kernels/step.cpp up to 16 rows), then ``keep`` (the rollback when every draft is
  rejected), then the next plain step (``after``: on the one-call step it would apply the drafts a
  rollback kept, runtime/state.py's deferred rows; with every draft rejected there are none);
- ``rows k``: the same 1 + k rows unjournaled (what the rows' arithmetic alone costs);
- with ``--layered``, the same verify and rollback through the layer-by-layer path (runtime/layers.py,
  ``fused_step`` off: how verifies ran before the one-call rows; its journal writes the states after the
  first row and its rollback re-runs the kept rows; the step after it runs on the one-call path, as
  the second plain step does).
A rejected verify costs ``verify + keep + after`` where two plain steps cost ``step + step``: ``rejected``
below is the difference over one step, in all and per draft (the issue asks a rejected draft to cost
< 10% of a step). A verify whose drafts are all accepted yields 1 + k tokens, so ``tok/s if all
accepted`` is (1 + k) / verify against 1 / step. Medians over ``--rounds``.
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


def measure(model: HybridModel, depth: int, drafts: list[int], rounds: int, layered: bool) -> dict[str, object]:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (depth + 1 + max(drafts),), generator=torch.Generator().manual_seed(0))
    state = model.new_state(depth + 32)
    model.forward(ids[:depth], state)
    snap = state.snapshot()
    fed, then = ids[depth : depth + 1], ids[depth + 1 : depth + 2]  # the step's token, the next step's
    paths = (True, False) if layered else (True,)  # fused_step: the one-call rows, the layer-by-layer path
    step: list[float] = []
    second: list[float] = []
    verify: dict[tuple[int, bool], list[float]] = {(k, p): [] for k in drafts for p in paths}
    keep: dict[tuple[int, bool], list[float]] = {(k, p): [] for k in drafts for p in paths}
    after: dict[tuple[int, bool], list[float]] = {(k, p): [] for k in drafts for p in paths}
    rows: dict[int, list[float]] = {k: [] for k in drafts}
    for r in range(rounds + 1):  # round 0 warms up (the journal's buffers are allocated there)
        state.restore(snap)
        settle()
        t0 = time.perf_counter()
        model.forward(fed, state)
        t1 = time.perf_counter()
        model.forward(then, state)
        t2 = time.perf_counter()
        if r:
            step.append(t1 - t0)
            second.append(t2 - t1)
        for k in drafts:
            model.fused_step = True
            state.restore(snap)
            settle()
            t0 = time.perf_counter()
            model.forward(ids[depth : depth + 1 + k], state, all_logits=True)
            if r:
                rows[k].append(time.perf_counter() - t0)
            for one_call in paths:
                model.fused_step = one_call
                state.restore(snap)
                settle()
                t0 = time.perf_counter()
                state.journal_next()
                model.forward(ids[depth : depth + 1 + k], state, all_logits=True)
                t1 = time.perf_counter()
                model.keep(state, 1)
                t2 = time.perf_counter()
                model.fused_step = True  # the next step as plain steps run (the second step's path)
                model.forward(then, state)
                t3 = time.perf_counter()
                if r:
                    verify[k, one_call].append(t1 - t0)
                    keep[k, one_call].append(t2 - t1)
                    after[k, one_call].append(t3 - t2)
        model.fused_step = True
    med = statistics.median
    s, s2 = med(step), med(second)
    out: dict[str, object] = {"depth": depth, "rounds": rounds, "step_ms": s * 1e3, "second_step_ms": s2 * 1e3}
    for k in drafts:
        for one_call in paths:
            v, kp, a = med(verify[k, one_call]), med(keep[k, one_call]), med(after[k, one_call])
            rejected = (v + kp + a - s2) / s  # what the verify, its rollback and the step after cost beyond a step
            out[f"k{k}" if one_call else f"k{k}_layered"] = {
                "verify_ms": v * 1e3,
                "keep_ms": kp * 1e3,
                "after_ms": a * 1e3,
                "verify_over_step": v / s,
                "rejected_over_step": rejected,
                "rejected_per_draft": (rejected - 1) / k,
                "rows_over_step": med(rows[k]) / s,
                "all_accepted_speedup": (1 + k) * s / v,
            }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precisions", default="bfloat16", help=f"comma-separated: {', '.join(PRECISIONS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--drafts", default="1,2,4,8,15", help="draft counts k (a verify feeds 1 + k rows)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--layered", action="store_true", help="also the layer-by-layer verify, in the same rounds")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    drafts = [int(k) for k in args.drafts.split(",")]
    print(f"verify cost, real shape (random weights), threads {args.threads}, depth {args.depth}, medians")
    results = {}
    for name in args.precisions.split(","):
        dtype, quantize = PRECISIONS[name]
        model = HybridModel.from_config(real_config(), dtype=dtype, quantize=quantize)
        r = measure(model, args.depth, drafts, args.rounds, args.layered)
        results[name] = r
        print(f"{name}: step {r['step_ms']:.2f} ms, the next one {r['second_step_ms']:.2f} ms")
        for k in drafts:
            for key in (f"k{k}", f"k{k}_layered"):
                f = r.get(key)
                if not isinstance(f, dict):
                    continue
                rejected = f["rejected_over_step"]
                print(
                    f"  k={k:2d}{' layer-by-layer' if key.endswith('layered') else ''}: verify {f['verify_ms']:.2f} ms"
                    f" ({f['verify_over_step']:.2f}x step), keep {f['keep_ms']:.2f} ms, next step"
                    f" {f['after_ms']:.2f} ms; all rejected {rejected:.2f}x"
                    f" step (+{(rejected - 1) * 100:.0f}%, +{f['rejected_per_draft'] * 100:.1f}% per draft; rows"
                    f" unjournaled {f['rows_over_step']:.2f}x),"
                    f" all accepted {f['all_accepted_speedup']:.2f}x tok/s"
                )
        del model
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
