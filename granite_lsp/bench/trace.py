"""``granite-lsp bench``: replay an editing trace through the real server, as an editor would drive it.

Each mode runs its own server process over stdio (the LSP path an editor uses): ``reuse`` (our runtime
with the state cache), ``no-spec`` (the same without speculative decoding: ``--mode spec`` runs both
and compares them), ``no-reuse`` (same runtime, every prompt from zero) and ``transformers``
(transformers' model and cache, full prompt every time). Edits are always replayed in full; the slow
modes may answer only a sample of the completion requests (``--slow-steps``), which the report states.

Trace format (JSON Lines, LSP UTF-16 positions):
  {"op":"open","uri":U,"languageId":L,"text":T}
  {"op":"change","uri":U,"range":{"start":{"line":..,"character":..},"end":{..}},"text":T}
  {"op":"complete","uri":U,"line":N,"character":C,"kind":K}   (kind optional, default "type")
  {"op":"wait","ms":N}                   the user reads or pauses: nothing is sent for N ms
  {"op":"focus","uri":U,"line":N,"character":C}   the editor's granite/focus (cursor moved, no request)

Completions are reported per ``kind`` (the moment they stand for: "type", "first", "jump", "back", ...),
with the time to the first partial that shows new text (the bench opts into partial notifications, as
our editor clients do) and its parts (``latency``: the server's phases of each request, the wait for the
model thread by what held it), the work the server did in the background (between requests) apart, and
the server's resident memory during the replay against the cache cap + weights + 100 MB (``rss_watch``).

This module is the command (its options, the modes of ``--mode``, the loop over traces); one mode's
replay through a server is ``replay.py``'s, the figures and their printing ``trace_report.py``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .replay import run_mode
from .trace_report import report, together

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = REPO / "bench" / "traces" / "type_function.jsonl"
MODES = ("reuse", "no-spec", "no-reuse", "transformers")


def load_trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="granite-lsp bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", action="store_true", help="runtime speed per precision (bench/microbench.py)")
    p.add_argument("trace", nargs="*", type=Path, help=f"trace files (default: {DEFAULT_TRACE.name})")
    p.add_argument("--model", default=str(REPO / "model" / "tiny"), help="model (and tokenizer) directory")
    p.add_argument("--random-weights", default="", help="config dir/file of a model to build with random weights")
    p.add_argument("--mode", choices=(*MODES, "both", "spec", "all"), default="both")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", choices=("none", "int8"), default="none")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--slow-steps", type=int, default=0, help="completions answered in slow modes (0: all)")
    p.add_argument(
        "--no-progressive",
        dest="progressive",
        action="store_false",
        help="serve every request from the full window (no short window first; progressive.py)",
    )
    p.add_argument(
        "--no-trail",
        dest="trail",
        action="store_false",
        help="no choices from the previous generation's trail (engine.py): every healing token a forward",
    )
    p.add_argument("--limit", type=int, default=0, help="replay only the first N trace operations")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    modes = {"both": ("reuse", "no-reuse"), "spec": ("reuse", "no-spec"), "all": MODES}.get(args.mode, (args.mode,))
    paths = args.trace or [DEFAULT_TRACE]
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    every: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        trace = load_trace(path)
        if args.limit:
            trace = trace[: args.limit]
        results = {}
        for mode in modes:
            print(f"running {mode} on {path.name} ...", file=sys.stderr)
            results[mode] = run_mode(mode, trace, args)
            every.setdefault(mode, []).append(results[mode])
        if len(paths) > 1:
            print(f"\n######## {path.name}")
        summary = report(results)
        out["summary"], out["results"] = summary, results  # the last trace's, as with one trace
        out.setdefault("traces", {})[path.name] = {"summary": summary, "results": results}
    if len(paths) > 1:
        out["together"] = together(every)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0
