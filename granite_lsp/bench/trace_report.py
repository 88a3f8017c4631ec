"""What ``granite-lsp bench`` reports of a trace's replays: per mode, medians and p95 over the
completions that ran the model, by moment of the trace, speculation, latency and RSS; each mode against
``reuse`` in the same run; and, over several traces, their latency and waits together.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..timeline import percentiles
from .latency import phase_summary, print_latency, wait_summary
from .replay import METRICS
from .rss_watch import report_line

# The per-completion figures summarized (medians, p95, means), in the report's order.
STATS = (*METRICS, "request_ms", "first_visible_ms", "decode_step_ms", "request_over_decode")


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Medians and p95 over the completions that ran the model (typed-through ones are counted apart)."""
    rows = [r for r in rows if r.get("stop_reason") != "typed_through"]
    out = {}
    for key in STATS:
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


def mode_summary(res: dict[str, Any]) -> dict[str, Any]:
    """One mode's figures over its rows (``replay.run_mode``'s result)."""
    rows = res["rows"]
    ran = [r for r in rows if r.get("stop_reason") != "typed_through"]
    return {
        "completions": len(rows),
        "typed_through": len(rows) - len(ran),
        "peak_rss_mb": res["peak_rss_mb"],
        **summarize(rows),
        "by_kind": by_kind(rows),
        "background": background(res["server_stats"]),
        "speculation": speculation(rows),
        "phases": phase_summary(ran),
        "waits": wait_summary(rows),
        "server_waits": res["server_stats"].get("waits", {}),
        "replay_rss": res.get("replay_rss", {}),
    }


def _print_kinds(kinds: dict[str, dict[str, Any]]) -> None:
    print(f"{'kind':<14}{'n':>4}{'short':>6}{'request med':>13}{'p95':>9}{'tokens med':>12}{'p95':>7}")
    for kind, k in kinds.items():
        req, tok = k.get("request_ms", {}), k.get("processed_tokens", {})
        print(
            f"{kind:<14}{k['completions']:>4}{k['short_window']:>6}"
            f"{req.get('median', 0):>13.0f}{req.get('p95', 0):>9.0f}"
            f"{tok.get('median', 0):>12.0f}{tok.get('p95', 0):>7.0f}"
        )


def print_mode(mode: str, m: dict[str, Any]) -> None:
    """One mode's report (``mode_summary``'s figures)."""
    print(
        f"\n== {mode}: {m['completions']} completions ({m['typed_through']} typed through, no model run), "
        f"server peak RSS {m['peak_rss_mb']:.0f} MB (the model load included)"
    )
    print(f"{'metric':<20}{'median':>12}{'p95':>12}")
    s = {key: m[key] for key in STATS if key in m}
    for key, v in s.items():
        fmt = ".2f" if key == "request_over_decode" else ".1f"
        print(f"{key:<20}{v['median']:>12{fmt}}{v['p95']:>12{fmt}}")
    if len(m["by_kind"]) > 1:
        _print_kinds(m["by_kind"])
    sp = m["speculation"]
    print(
        f"decode: {sp['tokens_per_forward']:.2f} tokens per forward ({sp['decode_forwards']} forwards,"
        f" {sp['draft_tokens']} draft tokens fed, {sp['accepted_tokens']} accepted)"
    )
    if m["background"]:
        print("background work: " + ", ".join(f"{k} {v:.0f}" for k, v in m["background"].items()))
    print_latency(m["phases"], m["waits"])
    _print_rss(m["replay_rss"])
    if "request_over_decode" in s:
        print(
            f"keystroke (request to response) / its decode steps alone: median "
            f"{s['request_over_decode']['median']:.2f}x, p95 {s['request_over_decode']['p95']:.2f}x"
        )


def against_reuse(
    mode: str, rows: list[dict[str, Any]], reuse_rows: list[dict[str, Any]], modes: dict[str, Any]
) -> dict[str, Any]:
    """``mode`` / reuse, medians of the same run, and its identical completions; printed."""
    by_step = {r["step"]: r for r in reuse_rows}
    # Exactness over the steps where both ran the model from the same prompt (the baselines have no
    # state cache, hence no short window: the steps reuse served from the full one).
    both = [
        r
        for r in rows
        if r["step"] in by_step
        and by_step[r["step"]]["stop_reason"] != "typed_through"
        and (mode == "no-spec" or by_step[r["step"]].get("window", "full") == "full")  # no-spec: same cache
    ]
    same = sum(1 for r in both if by_step[r["step"]]["text"] == r["text"])
    om, med = modes[mode], modes["reuse"]
    ratios = {
        "prefill_ms": _ratio(om["prefill_ms"]["median"], med["prefill_ms"]["median"]),
        "total_ms": _ratio(om["total_ms"]["median"], med["total_ms"]["median"]),
        "request_ms": _ratio(om["request_ms"]["median"], med["request_ms"]["median"]),
        "decode_ms": _ratio(om["decode_ms"]["median"], med["decode_ms"]["median"]),
        "exact": f"{same}/{len(both)}",
    }
    print(
        f"\n{mode} / reuse (medians, same run): prompt processing {ratios['prefill_ms']:.1f}x, "
        f"decode {ratios['decode_ms']:.2f}x, total {ratios['total_ms']:.1f}x, "
        f"request {ratios['request_ms']:.2f}x; "
        f"identical completions {ratios['exact']}"
    )
    return ratios


def report(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Prints each mode's report, then each mode against reuse; returns the figures (the JSON's summary)."""
    summary: dict[str, Any] = {"modes": {}}
    for mode, res in results.items():
        summary["modes"][mode] = mode_summary(res)
        print_mode(mode, summary["modes"][mode])
    if results.get("reuse"):
        for mode in ("no-spec", "no-reuse", "transformers"):
            if mode in results:
                ratios = against_reuse(mode, results[mode]["rows"], results["reuse"]["rows"], summary["modes"])
                summary[f"{mode}_vs_reuse"] = ratios
    return summary


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
