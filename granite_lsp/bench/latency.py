"""Where a replayed completion's time goes, for ``granite-lsp bench``'s report.

Two clocks, said apart in the report:
- the client's: ``first_visible_ms`` runs from the bench's send of the request to its receipt of the
  first ``granite/partialCompletion`` that shows new text (what a user sees, transport included);
- the server's: the request's phases (``granite_lsp.timeline``) from its arrival at the server's handler
  to that partial written out (``first_visible``), each a difference of consecutive moments, so that
  they add up to it. ``transport`` is the client's figure less the server's, per request: framing,
  parsing and the pipes both ways. ``restore``: the engine's prefill of the requests that had nothing
  left to process (the checkpoint restore alone, part of ``prefill``); ``tokens to text``: tokens
  generated until one showed text (token healing: healed bytes show nothing), ``forwards to text``: the
  decode forwards run before it (each healing token costs one, except those taken from the engine's
  trail: engine.py).

The queue wait (``queue``: ready after the debounce -> the model thread starts it) is also reported by
what held the model thread when the request became ready (idle, another request, a prefetch, background
work ahead of requests): issue 15 wants the wait behind background work <= ~100 ms at p95.
"""

from __future__ import annotations

from typing import Any

from ..timeline import BEHIND, PHASES, percentiles

PHASE_ORDER = (*PHASES.values(), "first_visible", "transport")


def row_fields(last: dict[str, Any], client_first_visible_ms: float | None) -> dict[str, Any]:
    """What a trace row keeps of the server's figures for its request (``granite/stats``' ``last``)."""
    phases = dict(last.get("phases") or {})
    server = phases.get("first_visible")
    if client_first_visible_ms is not None and server is not None:
        phases["transport"] = client_first_visible_ms - server
    return {
        "phases": phases,
        "behind": last.get("behind"),
        "steps_to_visible": last.get("steps_to_visible"),
        "forwards_to_visible": last.get("forwards_to_visible"),
    }


def phase_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per phase: count, median, p95 over the rows that have it (ms)."""
    out = {}
    for name in PHASE_ORDER:
        values = [r["phases"][name] for r in rows if name in (r.get("phases") or {})]
        if values:
            out[name] = percentiles(values)
    restores = [r["prefill_ms"] for r in rows if r.get("processed_tokens") == 0 and r.get("prefill_ms") is not None]
    if restores:  # the engine's prefill when nothing was left to process: the checkpoint restore alone
        out["restore"] = percentiles(restores)
    for key in ("steps_to_visible", "forwards_to_visible"):
        counts = [float(r[key]) for r in rows if r.get(key) is not None]
        if counts:
            out[key] = {k.removesuffix("_ms"): v for k, v in percentiles(counts).items()}
    return out


def wait_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The queue wait of the replayed requests, by what held the model thread when each became ready."""
    out = {}
    for behind in BEHIND:
        values = [r["phases"]["queue"] for r in rows if r.get("behind") == behind and "queue" in r["phases"]]
        if values:
            out[behind] = percentiles(values)
    return out


def print_latency(phases: dict[str, dict[str, float]], waits: dict[str, dict[str, float]]) -> None:
    if phases:
        print(
            "time to first visible text, per phase (server clock from the request's arrival at its handler; "
            "transport = the client's figure from its send, less the server's):"
        )
        print(f"  {'phase':<16}{'n':>5}{'median ms':>11}{'p95 ms':>9}")
        for name, v in phases.items():
            if name == "restore":
                print(f"  {'(restore only)':<16}{v['count']:>5}{v['median_ms']:>11.1f}{v['p95_ms']:>9.1f}")
            elif name in ("steps_to_visible", "forwards_to_visible"):
                label = "tokens to text" if name == "steps_to_visible" else "forwards to text"
                print(f"  {label:<16}{v['count']:>5}{v['median']:>11.1f}{v['p95']:>9.1f}")
            else:
                print(f"  {name:<16}{v['count']:>5}{v['median_ms']:>11.1f}{v['p95_ms']:>9.1f}")
    if waits:
        print("wait for the model thread once ready (queue), by what held it when the request became ready:")
        for behind, v in waits.items():
            print(
                f"  behind {behind:<11} n {v['count']:>4}  median {v['median_ms']:7.1f} ms  p95 {v['p95_ms']:7.1f} ms"
                f"  max {v['max_ms']:7.1f} ms"
            )
