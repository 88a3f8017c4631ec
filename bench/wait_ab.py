"""The wait behind background work, before/after: the issue-15 traces replayed through two checkouts, alternating.

    .venv/bin/python bench/wait_ab.py --base /path/to/baseline/checkout [--rounds 2] [-- extra bench args]

Each round runs ``granite-lsp bench`` (the real server, one per trace) on the same traces and settings,
first from ``--base`` (its code on PYTHONPATH, this venv's packages), then from this checkout, so a
noisy machine's load falls on both alike. It pools over the rounds, per side:
- the requests' waits for the model thread when background work held it (the queue phase of the trace
  rows whose ``behind`` is ``background``): count, median, p95, max (timeline.percentiles);
- the work ahead's pieces (``background.piece_ms_median``/``p95`` of each server, medians over servers),
  its tokens and ms, and the state cache's pieces finished/abandoned where the checkout counts them.
The default traces and settings are issue 15's: real shape with random weights, bf16, 2 threads,
16-token suggestions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from granite_lsp.timeline import percentiles  # noqa: E402

TRACES = ["open_wait_type", "jump_and_back", "paste_above", "edit_imports"]
SETTINGS = [
    "--mode", "reuse", "--random-weights", "model/granite-4.0-h-350m", "--dtype", "bfloat16",
    "--threads", "2", "--max-tokens", "16", "--ignore-eos",
]  # fmt: skip


def run(checkout: Path, traces: list[str], extra: list[str], out: Path) -> dict[str, Any]:
    """One ``granite-lsp bench`` over ``traces`` with ``checkout``'s code (run from there: ``-m`` puts the
    working directory first on the path, the server's subprocess's too); its JSON."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    paths = [str(REPO / "bench" / "traces" / f"{t}.jsonl") for t in traces]
    cmd = [sys.executable, "-m", "granite_lsp", "bench", *paths, *SETTINGS, *extra, "--json", str(out)]
    subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def collect(result: dict[str, Any], into: dict[str, list[Any]]) -> None:
    for trace in result["traces"].values():
        for res in trace["results"].values():
            rows = res["rows"]
            behind = [r for r in rows if r.get("behind") == "background" and "queue" in r["phases"]]
            into["waits"] += [r["phases"]["queue"] for r in behind]
            stats = res["server_stats"]
            bg = stats.get("background") or {}
            for key in ("piece_ms_median", "piece_ms_p95", "tokens", "ms", "runs", "preempted"):
                if key in bg:
                    into[key].append(bg[key])
            cache = stats.get("cache") or {}
            for key in ("pieces_finished", "pieces_abandoned", "abandoned_tokens"):
                if key in cache:
                    into[key].append(cache[key])


def summary(side: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"waits_behind_background": percentiles(side["waits"])}
    for key in ("piece_ms_median", "piece_ms_p95"):
        if side[key]:
            out[key] = statistics.median(side[key])
    for key in ("tokens", "ms", "runs", "preempted", "pieces_finished", "pieces_abandoned", "abandoned_tokens"):
        if side[key]:
            out[key] = sum(side[key])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="a checkout of the baseline (e.g. a git worktree)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("extra", nargs="*", help="more granite-lsp bench arguments (after --)")
    args = ap.parse_args(argv)
    traces = args.traces.split(",")
    sides: dict[str, dict[str, list[Any]]] = {}
    keys = ["waits", "piece_ms_median", "piece_ms_p95", "tokens", "ms", "runs", "preempted"]
    keys += ["pieces_finished", "pieces_abandoned", "abandoned_tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, checkout in (("base", args.base.resolve()), ("this", REPO)):
                side = sides.setdefault(name, {k: [] for k in keys})
                collect(run(checkout, traces, args.extra, Path(tmp) / f"{name}{r}.json"), side)
                print(f"round {r + 1}/{args.rounds} {name}: {summary(side)['waits_behind_background']}", flush=True)
    out = {name: summary(side) for name, side in sides.items()}
    print(f"\nwait behind background work, {args.rounds} alternating rounds (shared machine: noisy)")
    for name, s in out.items():
        w = s["waits_behind_background"]
        figures = f"n {w['count']}"
        if w["count"]:
            figures += f", median {w['median_ms']:.0f} ms, p95 {w['p95_ms']:.0f} ms, max {w['max_ms']:.0f} ms"
        rest = ", ".join(f"{k} {v:.0f}" for k, v in s.items() if k != "waits_behind_background")
        print(f"  {name:<5} {figures}; {rest}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
