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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..protocol import STREAMING_CAPABILITY
from ..timeline import percentiles
from .client import RpcClient
from .latency import phase_summary, print_latency, row_fields, wait_summary
from .rss_watch import RssSampler, lifetime_peak_mb, report_line, rss_bound, runtime_baseline_mb, split

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = REPO / "bench" / "traces" / "type_function.jsonl"
MODES = ("reuse", "no-spec", "no-reuse", "transformers")
# A request of a slow mode (transformers on the real shape, full prompt) may take minutes.
SLOW = 3600.0
PARTIAL = "granite/partialCompletion"
METRICS = ("prompt_tokens", "processed_tokens", "reused_tokens", "prefill_ms", "decode_ms", "total_ms")


def load_trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sample(indices: list[int], n: int) -> set[int]:
    if n <= 0 or n >= len(indices):
        return set(indices)
    step = (len(indices) - 1) / (n - 1) if n > 1 else 0
    return {indices[round(i * step)] for i in range(n)}


def _start(mode: str, args: argparse.Namespace) -> tuple[RpcClient, float]:
    """A server for ``mode`` with the model loaded, and the seconds the load took."""
    options = {
        "maxTokens": args.max_tokens,
        "ignoreEos": args.ignore_eos,
        "raw": True,
        "reuse": mode in ("reuse", "no-spec"),
        "typeThrough": mode in ("reuse", "no-spec"),  # the baselines have no caches at all
        "speculate": mode != "no-spec",
        # Speculation is single-candidate decoding's (Engine.generate): an invoked request asking for
        # several candidates decodes them as rows of one batched step (candidates.py), which does not
        # speculate. --mode spec compares speculation on one candidate per request.
        **({"candidates": 1} if getattr(args, "mode", None) == "spec" else {}),
        "backend": "transformers" if mode == "transformers" else "native",
        "randomWeights": str(Path(args.random_weights).resolve() / "config.json")
        if args.random_weights and Path(args.random_weights).is_dir()
        else (args.random_weights or ""),
        "debounceMs": 0,
        "progressive": getattr(args, "progressive", True),
        "trail": getattr(args, "trail", True),
    }
    cmd = [sys.executable, "-m", "granite_lsp", "--stdio", "--model", str(args.model), "--device", args.device]
    cmd += ["--dtype", args.dtype]
    if args.quantize != "none":
        cmd += ["--quantize", args.quantize]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = RpcClient(cmd)
    t0 = time.perf_counter()
    server.call(
        "initialize",
        {
            "processId": os.getpid(),
            "rootUri": None,
            "capabilities": {"experimental": {STREAMING_CAPABILITY: True}},
            "initializationOptions": options,
        },
        timeout=SLOW,
    )
    server.notify("initialized", {})
    status = server.wait_ready(1800.0)
    if status["state"] != "ready":
        server.close()
        raise RuntimeError(f"{mode}: model failed to load: {status['message']}")
    return server, time.perf_counter() - t0


def _complete(server: RpcClient, step: int, op: dict[str, Any]) -> dict[str, Any]:
    """One completion request of the trace, timed, with the server's own figures for it."""
    params = {
        "textDocument": {"uri": op["uri"]},
        "position": {"line": op["line"], "character": op["character"]},
        # Automatic, as editors send while the user types: one candidate (typingCandidates). Invoked, each
        # keystroke would decode the alternatives too (candidates), which no editor asks for while typing.
        "context": {"triggerKind": 2},
    }
    seen = len(server.notifications)
    t = time.monotonic()
    msg_id = server.request("textDocument/inlineCompletion", params)
    response = server.wait(msg_id, timeout=SLOW)
    wall_ms = (time.monotonic() - t) * 1000.0
    if "error" in response:
        raise RuntimeError(f"inlineCompletion failed: {response['error']}")
    last = server.call("granite/stats", None)["last"]
    items = (response.get("result") or {}).get("items", [])
    first_visible = _first_visible_ms(server, seen, str(msg_id), t)
    r = {
        "step": step,
        "kind": op.get("kind", "type"),
        "text": items[0]["insertText"] if items else "",
        "request_ms": wall_ms,
        "first_visible_ms": first_visible,  # the client's clock, from its send
        **{k: last.get(k) for k in METRICS},
        "generated_tokens": last.get("generated_tokens"),
        # speculative decoding (speculate.py): forwards run, drafts fed, drafts that became output
        "decode_forwards": last.get("decode_forwards"),
        "draft_tokens": last.get("draft_tokens"),
        "accepted_tokens": last.get("accepted_tokens"),
        "stop_reason": last.get("stop_reason"),
        **row_fields(last, first_visible),
        "window": last.get("window"),
    }
    steps = (r["generated_tokens"] or 0) - 1  # the first token comes from the prompt's logits
    if steps > 0 and r.get("decode_ms"):
        # the request's wall time against that many tokens' worth of decode steps alone
        r["decode_step_ms"] = r["decode_ms"] / steps
        r["request_over_decode"] = wall_ms / (r["decode_step_ms"] * r["generated_tokens"])
    return r


def _first_visible_ms(server: RpcClient, seen: int, request_id: str, t0: float) -> float | None:
    """When the first partial of this request that shows new text arrived (ms after the request)."""
    with server._cv:
        notes = list(zip(server.notifications[seen:], server.notified_at[seen:], strict=True))
    for note, at in notes:
        p = note.get("params") or {}
        if note["method"] == PARTIAL and p.get("requestId") == request_id and p.get("text"):
            return (at - t0) * 1000.0
    return None


def run_mode(mode: str, trace: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Replay ``trace`` through a server of ``mode``: every edit, and the completions it answers."""
    server, load_s = _start(mode, args)
    completes = [i for i, op in enumerate(trace) if op["op"] == "complete"]
    wanted = set(completes) if mode == "reuse" else _sample(completes, args.slow_steps)
    rows: list[dict[str, Any]] = []
    versions: dict[str, int] = {}
    rss = RssSampler(server.proc.pid).start()
    for i, op in enumerate(trace):
        kind = op["op"]
        if kind == "open":
            versions[op["uri"]] = 1
            doc = {"uri": op["uri"], "languageId": op.get("languageId", "plaintext"), "version": 1, "text": op["text"]}
            server.notify("textDocument/didOpen", {"textDocument": doc})
        elif kind == "change":
            versions[op["uri"]] += 1
            change = {"range": op["range"], "text": op["text"]} if "range" in op else {"text": op["text"]}
            server.notify(
                "textDocument/didChange",
                {"textDocument": {"uri": op["uri"], "version": versions[op["uri"]]}, "contentChanges": [change]},
            )
        elif kind == "wait":
            time.sleep(op["ms"] / 1000.0)
        elif kind == "focus":
            position = {"line": op["line"], "character": op["character"]}
            server.notify("granite/focus", {"textDocument": {"uri": op["uri"]}, "position": position})
        elif kind == "complete" and i in wanted:
            rows.append(r := _complete(server, i, op))
            if args.verbose:
                print(
                    f"  [{mode}] step {i}: re-processed {r['processed_tokens']}, prefill {r['prefill_ms']:.0f} ms, "
                    f"decode {r['decode_ms']:.0f} ms, request {r['request_ms']:.0f} ms",
                    file=sys.stderr,
                )
    measured = {**rss.stop(), **rss_bound(server.call("granite/stats", None))}
    replay_rss = {**measured, **split(measured), "runtime_mb": runtime_baseline_mb()}
    stats = server.call("granite/stats", None)
    peak = lifetime_peak_mb(server.peak_rss_mb(), stats)
    server.close()
    out = {"mode": mode, "load_s": load_s, "rows": rows, "server_stats": stats, "peak_rss_mb": peak}
    return {**out, "replay_rss": replay_rss}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Medians and p95 over the completions that ran the model (typed-through ones are counted apart)."""
    rows = [r for r in rows if r.get("stop_reason") != "typed_through"]
    out = {}
    for key in (*METRICS, "request_ms", "first_visible_ms", "decode_step_ms", "request_over_decode"):
        values = sorted(float(r[key]) for r in rows if r.get(key) is not None)
        if not values:
            continue
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        out[key] = {"median": statistics.median(values), "p95": p95, "mean": statistics.fmean(values)}
    return out


def by_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per moment of the trace: request time and tokens re-processed, medians and p95."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({r.get("kind", "type") for r in rows}):
        mine = [r for r in rows if r.get("kind", "type") == kind]
        short = sum(r.get("window") == "short" for r in mine)
        out[kind] = {"completions": len(mine), "short_window": short, **summarize(mine)}
    return out


def background(stats: dict[str, Any]) -> dict[str, float]:
    """The server's work ahead of requests (tokens, ms), apart from the requests' own."""
    return dict(stats.get("background") or {})


def _print_rss(rss: dict[str, float]) -> None:
    if rss.get("samples"):
        print(report_line(rss))


def speculation(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Decode tokens per forward over the completions that ran the model (the first token of each comes
    from its prompt's logits: plain decoding is 1.0), and the drafts fed and accepted."""
    rows = [r for r in rows if r.get("stop_reason") != "typed_through" and r.get("decode_forwards") is not None]
    forwards = sum(r["decode_forwards"] for r in rows)
    tokens = sum(max(0, (r["generated_tokens"] or 0) - 1) for r in rows)
    drafted = sum(r["draft_tokens"] or 0 for r in rows)
    accepted = sum(r["accepted_tokens"] or 0 for r in rows)
    return {
        "decode_forwards": forwards,
        "tokens_per_forward": _ratio(tokens, forwards) if forwards else 1.0,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def report(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"modes": {}}
    for mode, res in results.items():
        s = summarize(res["rows"])
        through = sum(r.get("stop_reason") == "typed_through" for r in res["rows"])
        ran = [r for r in res["rows"] if r.get("stop_reason") != "typed_through"]
        summary["modes"][mode] = {
            "completions": len(res["rows"]),
            "typed_through": through,
            "peak_rss_mb": res["peak_rss_mb"],
            **s,
            "by_kind": by_kind(res["rows"]),
            "background": background(res["server_stats"]),
            "speculation": speculation(res["rows"]),
            "phases": phase_summary(ran),
            "waits": wait_summary(res["rows"]),
            "server_waits": res["server_stats"].get("waits", {}),
            "replay_rss": res.get("replay_rss", {}),
        }
        print(
            f"\n== {mode}: {len(res['rows'])} completions ({through} typed through, no model run), "
            f"server peak RSS {res['peak_rss_mb']:.0f} MB (the model load included)"
        )
        print(f"{'metric':<20}{'median':>12}{'p95':>12}")
        for key, v in s.items():
            fmt = ".2f" if key == "request_over_decode" else ".1f"
            print(f"{key:<20}{v['median']:>12{fmt}}{v['p95']:>12{fmt}}")
        kinds = summary["modes"][mode]["by_kind"]
        if len(kinds) > 1:
            print(f"{'kind':<14}{'n':>4}{'short':>6}{'request med':>13}{'p95':>9}{'tokens med':>12}{'p95':>7}")
            for kind, k in kinds.items():
                req, tok = k.get("request_ms", {}), k.get("processed_tokens", {})
                print(
                    f"{kind:<14}{k['completions']:>4}{k['short_window']:>6}"
                    f"{req.get('median', 0):>13.0f}{req.get('p95', 0):>9.0f}"
                    f"{tok.get('median', 0):>12.0f}{tok.get('p95', 0):>7.0f}"
                )
        sp = summary["modes"][mode]["speculation"]
        print(
            f"decode: {sp['tokens_per_forward']:.2f} tokens per forward ({sp['decode_forwards']} forwards,"
            f" {sp['draft_tokens']} draft tokens fed, {sp['accepted_tokens']} accepted)"
        )
        bg = summary["modes"][mode]["background"]
        if bg:
            print("background work: " + ", ".join(f"{k} {v:.0f}" for k, v in bg.items()))
        print_latency(summary["modes"][mode]["phases"], summary["modes"][mode]["waits"])
        _print_rss(summary["modes"][mode]["replay_rss"])
        if "request_over_decode" in s:
            print(
                f"keystroke (request to response) / its decode steps alone: median "
                f"{s['request_over_decode']['median']:.2f}x, p95 {s['request_over_decode']['p95']:.2f}x"
            )
    base = results.get("reuse")
    if base:
        by_step = {r["step"]: r for r in base["rows"]}
        med = summary["modes"]["reuse"]
        for mode in ("no-spec", "no-reuse", "transformers"):
            if mode not in results:
                continue
            other = results[mode]["rows"]
            # Exactness over the steps where both ran the model from the same prompt (the baselines have no
            # state cache, hence no short window: the steps reuse served from the full one).
            both = [
                r
                for r in other
                if r["step"] in by_step
                and by_step[r["step"]]["stop_reason"] != "typed_through"
                and (mode == "no-spec" or by_step[r["step"]].get("window", "full") == "full")  # no-spec: same cache
            ]
            same = sum(1 for r in both if by_step[r["step"]]["text"] == r["text"])
            om = summary["modes"][mode]
            ratios = {
                "prefill_ms": _ratio(om["prefill_ms"]["median"], med["prefill_ms"]["median"]),
                "total_ms": _ratio(om["total_ms"]["median"], med["total_ms"]["median"]),
                "request_ms": _ratio(om["request_ms"]["median"], med["request_ms"]["median"]),
                "decode_ms": _ratio(om["decode_ms"]["median"], med["decode_ms"]["median"]),
                "exact": f"{same}/{len(both)}",
            }
            summary[f"{mode}_vs_reuse"] = ratios
            print(
                f"\n{mode} / reuse (medians, same run): prompt processing {ratios['prefill_ms']:.1f}x, "
                f"decode {ratios['decode_ms']:.2f}x, total {ratios['total_ms']:.1f}x, "
                f"request {ratios['request_ms']:.2f}x; "
                f"identical completions {ratios['exact']}"
            )
    return summary


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


def together(every: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The first visible text's phases, the waits for the model thread and the RSS over all the traces
    replayed (each by its own server): the issue's figures are over a set of traces, not one."""
    out: dict[str, Any] = {}
    for mode, runs in every.items():
        rows = [r for res in runs for r in res["rows"]]
        ran = [r for r in rows if r.get("stop_reason") != "typed_through"]
        rss: list[dict[str, float]] = [res["replay_rss"] for res in runs if res.get("replay_rss", {}).get("samples")]
        worst: dict[str, float] = max(rss, key=lambda x: x["over_bound_mb"], default={})
        client = percentiles([r["first_visible_ms"] for r in ran if r.get("first_visible_ms") is not None])
        out[mode] = {
            "first_visible_ms": client, "phases": phase_summary(ran), "waits": wait_summary(rows),
            "replay_rss_worst": worst,
        }  # fmt: skip
        print(f"\n######## all {len(runs)} traces together, {mode}: {len(rows)} completions")
        if client["count"]:
            print(
                f"first visible text, client clock from its send: median {client['median_ms']:.1f} ms, p95 "
                f"{client['p95_ms']:.1f} ms over {client['count']} completions that ran the model"
            )
        print_latency(out[mode]["phases"], out[mode]["waits"])
        if worst:
            print("the trace closest to (or furthest over) the memory bound:")
            _print_rss(worst)
    return out
