"""Where a background piece's time goes: one preemptible piece of work ahead at depth, on the real shape.

    .venv/bin/python bench/piece_cost.py [--precision bfloat16] [--threads 2] [--depth 1500] [--sizes 8,16,32,64]

Random weights of Granite-4.0-H-350M's shape (speed does not depend on their values). A state cache is
brought to ``depth`` tokens; then, in alternating rounds (every part and size timed in each round, so the
machine's load falls on all of them alike), from that same checkpoint:
- ``piece T``: what a request waiting behind background work waits for, one preemptible piece of T
  tokens as ``StateCache.prefill`` runs it when told to yield after it (restore, forward, the resume
  checkpoint, eviction check), minus nothing;
- ``forward T``: the model's forward over T tokens alone (last row's logits);
- ``layers T``: the same forward's layers without the lm_head (``forward`` minus ``lm_head``);
- ``lm_head``: final norm + lm_head for one row (every forward ends with it);
- ``snapshot``: the copy of the Mamba states a checkpoint takes;
- ``restore``: a checkpoint's restore.
A straight line through the ``piece T`` medians gives a fixed cost per piece and a cost per token: the
piece size that fits a wait budget on this machine follows. Medians over ``--rounds``; timings on a
shared machine are noisy, the same-round parts compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from granite_lsp.bench.llama_baseline import settle  # noqa: E402
from granite_lsp.bench.shape import PRECISIONS, real_config  # noqa: E402
from granite_lsp.runtime import HybridModel  # noqa: E402
from granite_lsp.runtime.matmul import small_ops_single_threaded  # noqa: E402
from granite_lsp.state_cache import StateCache  # noqa: E402


def _fit(sizes: list[int], ms: list[float]) -> tuple[float, float]:
    """Least-squares fixed cost (ms) and cost per token (ms) of ``ms`` against ``sizes``."""
    slope, fixed = np.polyfit(np.asarray(sizes, dtype=float), np.asarray(ms, dtype=float), 1)
    return float(fixed), float(slope)


def measure(model: HybridModel, depth: int, sizes: list[int], rounds: int) -> dict[str, object]:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (depth + 2 * max(sizes),), generator=gen).tolist()
    cache = StateCache(model, max_bytes=4 << 30, interval=0)
    cache.prefill("doc", ids[:depth])  # the end checkpoint at depth: every round starts from it
    base = [c for c in cache.checkpoints if c.pos == depth][0]
    times: dict[str, list[float]] = {}

    def note(name: str, seconds: float, r: int) -> None:
        if r:
            times.setdefault(name, []).append(seconds * 1e3)

    for r in range(rounds + 1):  # round 0 warms up
        for T in sizes:
            # piece: as background work runs it, told to yield after its first piece
            cache.checkpoints = [base]
            cache._restore(base.snap, base.hold, base.tokens.tolist(), base.logits)
            settle()
            t0 = time.perf_counter()
            res = cache.prefill("doc", ids[: depth + 2 * T], should_yield=lambda: True, chunk=T)
            note(f"piece {T}", time.perf_counter() - t0, r)
            assert res.processed_tokens == T and not res.complete, (T, res)
            # the forward alone, and its layers without the lm_head
            cache.checkpoints = [base]
            cache._restore(base.snap, base.hold, base.tokens.tolist(), base.logits)
            settle()
            t0 = time.perf_counter()
            model.forward(torch.tensor(ids[depth : depth + T]), cache.live)
            note(f"forward {T}", time.perf_counter() - t0, r)
        hidden = torch.randn(1, model.config.hidden_size).to(model.dtype)
        settle()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.lm_head_logits(hidden)
        note("lm_head", time.perf_counter() - t0, r)
        settle()
        t0 = time.perf_counter()
        with small_ops_single_threaded():
            snap = cache.live.snapshot()
        note("snapshot", time.perf_counter() - t0, r)
        settle()
        t0 = time.perf_counter()
        with small_ops_single_threaded():
            cache.live.restore(base.snap, base.hold)
        note("restore", time.perf_counter() - t0, r)
        del snap
    med = {k: statistics.median(v) for k, v in times.items()}
    for T in sizes:
        med[f"layers {T}"] = med[f"forward {T}"] - med["lm_head"]
    fixed, per_token = _fit(sizes, [med[f"piece {T}"] for T in sizes])
    lfixed, lper = _fit(sizes, [med[f"layers {T}"] for T in sizes])
    return {
        "depth": depth,
        "rounds": rounds,
        "median_ms": med,
        "piece_fit": {"fixed_ms": fixed, "per_token_ms": per_token},
        "layers_fit": {"fixed_ms": lfixed, "per_token_ms": lper},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", default="bfloat16", help=", ".join(PRECISIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=1500)
    ap.add_argument("--sizes", default="8,16,32,64")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    dtype, quantize = PRECISIONS[args.precision]
    model = HybridModel.from_config(real_config(), dtype=dtype, quantize=quantize)
    r = measure(model, args.depth, sizes, args.rounds)
    print(f"background piece cost, real shape (random weights), {args.precision}, threads {args.threads},")
    print(f"depth {args.depth}, medians of {args.rounds} alternating rounds (shared machine: noisy)")
    med = r["median_ms"]
    assert isinstance(med, dict)
    for T in sizes:
        print(
            f"  T={T:3d}: piece {med[f'piece {T}']:7.1f} ms  forward {med[f'forward {T}']:7.1f} ms"
            f"  layers {med[f'layers {T}']:7.1f} ms  ({med[f'piece {T}'] / T:.2f} ms/token in a piece)"
        )
    print(
        f"  lm_head (1 row) {med['lm_head']:.1f} ms, snapshot {med['snapshot']:.1f} ms, restore {med['restore']:.1f} ms"
    )
    pf, lf = r["piece_fit"], r["layers_fit"]
    assert isinstance(pf, dict) and isinstance(lf, dict)
    print(f"  piece  = {pf['fixed_ms']:.1f} ms + {pf['per_token_ms']:.2f} ms/token")
    print(f"  layers = {lf['fixed_ms']:.1f} ms + {lf['per_token_ms']:.2f} ms/token")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
