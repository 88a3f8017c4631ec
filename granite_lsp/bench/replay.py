"""One mode's replay of an editing trace through the real server over stdio, as an editor drives it.

``run_mode`` starts a server for the mode (``reuse``, ``no-spec``, ``no-reuse``, ``transformers``:
``trace.py`` says what each is), sends every edit of the trace and the completion requests the mode
answers, and keeps one row per completion: the server's own figures for it (``granite/stats``), the
client's time to the first partial that shows new text, and the server's RSS sampled during the replay.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..protocol import STREAMING_CAPABILITY
from .client import RpcClient
from .latency import row_fields
from .rss_watch import RssSampler, lifetime_peak_mb, rss_bound, runtime_baseline_mb, split

# A request of a slow mode (transformers on the real shape, full prompt) may take minutes.
SLOW = 3600.0
PARTIAL = "granite/partialCompletion"
METRICS = ("prompt_tokens", "processed_tokens", "reused_tokens", "prefill_ms", "decode_ms", "total_ms")


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
