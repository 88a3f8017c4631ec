"""``granite-lsp bench TRACE --engine remote --endpoint URL --remote-model NAME [--clients 1,4,8]``:
replay a trace through granite-lsp servers whose engine is a shared OpenAI-compatible server.

One server process per simulated editor, each speaking LSP over stdio as an editor does, each replaying
the trace as fast as its answers come (the next keystroke is sent when the previous request is answered:
a closed loop, so a slower engine means fewer requests, never an ever-growing queue). Every keystroke
reaches the engine (typing-through off, no debounce, raw generations) so that the figures are the
engine's. Client k's document gets a first line of its own, so that clients do not share prompts
(editors on one engine work on different files) and an engine's prefix cache only helps within a
client, as it would in a team.

Reported per client count: request latency p50/p95 per client and over all clients, time to the first
token, and the engine's cached prompt tokens per keystroke (``granite/stats`` ``cached_tokens``: vLLM
reports them with ``--enable-prompt-tokens-details``, llama.cpp's server always). ``--compare-local``
first replays the trace with one editor on the in-process engine, the baseline of the ratios printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .client import RpcClient
from .trace import DEFAULT_TRACE, REPO, load_trace


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def _shifted(trace: list[dict[str, Any]], client: int) -> list[dict[str, Any]]:
    """The trace with a first line naming the client in each opened document (positions moved down)."""
    if client == 0:
        return trace
    out: list[dict[str, Any]] = []
    for original in trace:
        op: dict[str, Any] = json.loads(json.dumps(original))
        if op["op"] == "open":
            op["text"] = f"# editor {client}\n" + op["text"]
        elif op["op"] == "change" and "range" in op:
            op["range"]["start"]["line"] += 1
            op["range"]["end"]["line"] += 1
        elif op["op"] == "complete":
            op["line"] += 1
        out.append(op)
    return out


def _server_cmd(args: argparse.Namespace, local: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "granite_lsp", "--stdio", "--model", str(args.model)]
    if local:  # the baseline: the same model in process (its weights must be in --model)
        return [*cmd, "--device", "cpu"]
    cmd += ["--engine", "remote", "--endpoint", args.endpoint, "--remote-model", args.remote_model]
    if args.api_key_env:
        cmd += ["--api-key-env", args.api_key_env]
    return cmd


def start_client(args: argparse.Namespace, local: bool = False) -> RpcClient:
    server = RpcClient(_server_cmd(args, local))
    options = {"maxTokens": args.max_tokens, "raw": True, "typeThrough": False, "debounceMs": 0}
    init = {"processId": os.getpid(), "rootUri": None, "capabilities": {}, "initializationOptions": options}
    server.call("initialize", init)
    server.notify("initialized", {})
    status = server.wait_ready(timeout=120)
    if status["state"] != "ready":
        server.close()
        raise RuntimeError(f"the server did not reach the engine: {status['message']}")
    return server


def replay(
    server: RpcClient, trace: list[dict[str, Any]], start: threading.Barrier | None = None
) -> list[dict[str, Any]]:
    """Send the trace's operations; time each completion request from send to answer."""
    if start is not None:
        start.wait()
    rows: list[dict[str, Any]] = []
    versions: dict[str, int] = {}
    for i, op in enumerate(trace):
        if op["op"] == "open":
            versions[op["uri"]] = 1
            doc = {"uri": op["uri"], "languageId": op.get("languageId", "plaintext"), "version": 1, "text": op["text"]}
            server.notify("textDocument/didOpen", {"textDocument": doc})
        elif op["op"] == "change":
            versions[op["uri"]] += 1
            change = {"range": op["range"], "text": op["text"]} if "range" in op else {"text": op["text"]}
            server.notify(
                "textDocument/didChange",
                {"textDocument": {"uri": op["uri"], "version": versions[op["uri"]]}, "contentChanges": [change]},
            )
        elif op["op"] == "complete":
            params = {
                "textDocument": {"uri": op["uri"]},
                "position": {"line": op["line"], "character": op["character"]},
                "context": {"triggerKind": 1},
            }
            t = time.perf_counter()
            result = server.call("textDocument/inlineCompletion", params, timeout=600)
            request_ms = (time.perf_counter() - t) * 1000.0
            last = server.call("granite/stats", None)["last"]
            rows.append(
                {
                    "step": i,
                    "request_ms": request_ms,
                    "answered": bool(result and result.get("items")),
                    "first_token_ms": last.get("prefill_ms"),
                    "prompt_tokens": last.get("prompt_tokens"),
                    "cached_tokens": last.get("cached_tokens"),
                    "generated_tokens": last.get("generated_tokens"),
                    "stop_reason": last.get("stop_reason"),
                }
            )
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [r["request_ms"] for r in rows]
    first = [r["first_token_ms"] for r in rows if r["first_token_ms"] is not None]
    cached = [r["cached_tokens"] for r in rows if r["cached_tokens"] is not None]
    prompt = [r["prompt_tokens"] for r in rows if r["cached_tokens"] is not None]
    return {
        "requests": len(rows),
        "answered": sum(r["answered"] for r in rows),
        "unavailable": sum(r["stop_reason"] == "unavailable" for r in rows),
        "p50_ms": _percentile(lat, 0.5),
        "p95_ms": _percentile(lat, 0.95),
        "first_token_p50_ms": _percentile(first, 0.5),
        "cached_reported": len(cached),
        "cached_tokens_median": statistics.median(cached) if cached else None,
        "cached_share": sum(cached) / sum(prompt) if prompt and sum(prompt) else None,
        "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in rows) if rows else None,
    }


def run_load(
    args: argparse.Namespace, trace: list[dict[str, Any]], clients: int, local: bool = False
) -> dict[str, Any]:
    servers = [start_client(args, local) for _ in range(clients)]
    barrier = threading.Barrier(clients)
    results: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = replay(servers[k], _shifted(trace, k), barrier)
        except BaseException as e:  # noqa: BLE001 - reported below, the other clients finish
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for s in servers:
        s.close()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    per_client = [_summary(rows) for rows in results]
    every = [r for rows in results for r in rows]
    return {
        "engine": "local" if local else "remote",
        "clients": clients,
        "wall_s": wall,
        "requests_per_s": len(every) / wall if wall else float("nan"),
        "all": _summary(every),
        "per_client": per_client,
        "rows": results,
    }


def print_run(run: dict[str, Any]) -> None:
    a = run["all"]
    cached = "n/a" if a["cached_tokens_median"] is None else f"{a['cached_tokens_median']:.0f}"
    share = "" if a["cached_share"] is None else f" ({a['cached_share']:.0%} of prompt tokens)"
    print(
        f"\n== {run['engine']}, {run['clients']} editor(s): {a['requests']} requests in {run['wall_s']:.1f} s "
        f"({run['requests_per_s']:.1f}/s), answered {a['answered']}, unavailable {a['unavailable']}"
    )
    print(
        f"all clients: p50 {a['p50_ms']:.0f} ms, p95 {a['p95_ms']:.0f} ms, first token p50 "
        f"{a['first_token_p50_ms']:.0f} ms; prompt tokens median {a['prompt_tokens_median']}, "
        f"cached median {cached}{share}"
    )
    for k, c in enumerate(run["per_client"]):
        print(f"  editor {k}: p50 {c['p50_ms']:.0f} ms, p95 {c['p95_ms']:.0f} ms over {c['requests']} requests")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="granite-lsp bench --engine remote", description=__doc__.split("\n\n")[0])
    p.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--engine", choices=("remote",), required=True)
    p.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--remote-model", required=True, help="the model's name on the engine")
    p.add_argument("--api-key-env", default="", help="NAME of the environment variable holding the API key")
    p.add_argument("--model", default=str(REPO / "model" / "tiny"), help="where the tokenizer is (no weights needed)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--clients", default="1", help="simulated editors, e.g. 1,4,8 (one run per count)")
    p.add_argument("--limit", type=int, default=0, help="replay only the first N trace operations")
    p.add_argument(
        "--compare-local",
        action="store_true",
        help="first replay the trace with one editor on the in-process engine (--model's weights), as the baseline",
    )
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per keystroke of the first client")
    args = p.parse_args(argv)
    trace = load_trace(args.trace)
    if args.limit:
        trace = trace[: args.limit]
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    runs = []
    if args.compare_local:
        print("running 1 editor on the in-process engine (baseline) ...", file=sys.stderr)
        runs.append(run_load(args, trace, 1, local=True))
        print_run(runs[0])
    for n in counts:
        print(f"running {n} editor(s) against {args.endpoint} ...", file=sys.stderr)
        run = run_load(args, trace, n)
        if args.verbose:
            for r in run["rows"][0]:
                print(
                    f"  step {r['step']}: {r['request_ms']:.0f} ms, first token {r['first_token_ms']:.0f} ms, "
                    f"prompt {r['prompt_tokens']}, cached {r['cached_tokens']}, {r['stop_reason']}"
                )
        print_run(run)
        runs.append(run)
    if args.compare_local:
        base = runs[0]["all"]["p50_ms"]
        for run in runs[1:]:
            print(
                f"remote, {run['clients']} editor(s) / local, 1 editor (request p50, same run): "
                f"{run['all']['p50_ms'] / base:.2f}x"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))
    return 0
