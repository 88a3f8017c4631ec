"""The real server's resident memory while ``granite-lsp bench`` replays a trace, against issue 15's bound.

The server restarts the kernel's peak counter (VmHWM) once its model is loaded (``memory.Ledger``), so
that its ``granite/stats`` give the exact serving peak apart from the load's (weights converted piece by
piece, which says nothing about a session with background work on); VmRSS is also sampled from /proc on
a thread while the trace replays (start, end, and the peak where the kernel cannot reset). The bound for
that session is the state cache's cap + the model's weights + 100 MB (``rss_bound``), both read from the
server's own ``granite/stats``, and ``split`` breaks the peak into the server before its model (the
interpreter, torch, the modules), the weights, the cache at its most (its own accounting) and the rest.
Kept apart from ``rss.py`` (the real-shape checkpoint's peak), which needs torch.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def rss_mb(pid: int) -> float | None:
    """Resident memory (VmRSS) of process ``pid`` in MB; None when /proc cannot tell (gone, not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


@dataclass
class RssSampler:
    """VmRSS of ``pid`` every ``period`` seconds on a thread, from ``start`` to ``stop``."""

    pid: int
    period: float = 0.05
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            mb = rss_mb(self.pid)
            if mb is not None:
                self.samples.append(mb)
            if self._stop.wait(self.period):
                return

    def stop(self) -> dict[str, float]:
        """start_mb (the first sample), peak_mb, end_mb and the number of samples."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        s = self.samples
        if not s:
            return {"samples": 0}
        return {"samples": len(s), "start_mb": s[0], "peak_mb": max(s), "end_mb": s[-1]}


def rss_bound(stats: dict[str, Any], allowance_mb: float = 100.0) -> dict[str, float]:
    """Issue 15's memory bound from the server's own ``granite/stats``: cache cap + weights + 100 MB;
    what the cache held when the stats were taken (``cache_mb``) and the most it held (``cache_peak_mb``,
    its own accounting); the server's RSS before its model (``baseline_mb``: the interpreter, torch and
    the server's modules, in the server's own process) and its exact serving peak (``serving_peak_mb``:
    VmHWM since the model was loaded, where the kernel let the server reset it)."""
    cache = stats.get("cache") or {}
    cap = cache.get("max_bytes", 0) / 2**20
    model = stats.get("model_bytes", 0) / 2**20
    bound = cap + model + allowance_mb
    out = {
        "cache_cap_mb": cap, "cache_mb": cache.get("bytes", 0) / 2**20, "model_mb": model,
        "allowance_mb": allowance_mb, "bound_mb": bound,
    }  # fmt: skip
    if "peak_bytes" in cache:
        out["cache_peak_mb"] = cache["peak_bytes"] / 2**20
    memory = stats.get("memory") or {}
    stages = memory.get("stages") or {}
    if "imported" in stages:
        out["baseline_mb"] = stages["imported"]["rss"]
    for stage, at in stages.items():
        out[f"stage_{stage}_mb"] = at["rss"]
    if memory.get("peak_reset") and "peak" in (memory.get("now") or {}):
        out["serving_peak_mb"] = memory["now"]["peak"]
    if memory.get("load_peak_mb"):
        out["load_peak_mb"] = memory["load_peak_mb"]
    return out


def split(rss: dict[str, float]) -> dict[str, float]:
    """The replay's peak RSS (the exact serving peak where known, else the sampled one) and its parts:
    the server before its model (``baseline_mb``), the weights, the cache at its most (accounted), and
    ``rest_mb``, what is left (kernels, tokenizer, activations, the allocator's free pages, forks of the
    state for alternatives). The cache's most and the RSS peak need not coincide, so ``rest_mb`` is a
    floor of the rest at the peak; ``rest_end_mb`` is the rest at the end, everything read together."""
    if "peak_mb" not in rss:
        return {}  # nothing sampled (no /proc)
    peak = max(rss.get("serving_peak_mb", 0.0), rss["peak_mb"])
    out = {"replay_peak_mb": peak, "over_bound_mb": peak - rss["bound_mb"]}
    if "baseline_mb" in rss:
        base = rss["baseline_mb"]
        cache = rss.get("cache_peak_mb", rss["cache_mb"])
        out["rest_mb"] = peak - base - rss["model_mb"] - cache
        out["rest_end_mb"] = rss["end_mb"] - base - rss["model_mb"] - rss["cache_mb"]
        out["rest_within_allowance"] = float(out["rest_mb"] <= rss["allowance_mb"])
    out["within_bound"] = float(peak <= rss["bound_mb"])
    return out


def runtime_baseline_mb() -> float | None:
    """VmRSS of a fresh interpreter once it has imported the server (torch included) and nothing else:
    the part of the server's memory that is neither weights nor cache nor work, measured in this run."""
    code = (
        "import granite_lsp.server, granite_lsp.service\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1])"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
        return int(out.stdout.split()[-1]) / 1024.0
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def lifetime_peak_mb(hwm_mb: float, stats: dict[str, Any]) -> float:
    """The server's peak over its whole life, the model load included: its VmHWM (``hwm_mb``, read from
    /proc) restarts once the model is loaded (``memory.Ledger.ready``), which keeps the load's peak."""
    return max(hwm_mb, (stats.get("memory") or {}).get("load_peak_mb") or 0.0)


def report_line(rss: dict[str, float]) -> str:
    """The replay's RSS against the bound, and its parts: the server before its model, weights, cache, the rest."""
    parts = split(rss)
    verdict = "within" if parts["within_bound"] else "OVER"
    exact = "the exact serving peak (VmHWM since the load)" if "serving_peak_mb" in rss else "sampled"
    line = (
        f"server RSS during the replay: peak {parts['replay_peak_mb']:.0f} MB ({exact}; sampled: peak "
        f"{rss['peak_mb']:.0f}, start {rss['start_mb']:.0f}, end {rss['end_mb']:.0f}, {rss['samples']:.0f} samples);"
        f" bound: cache cap "
        f"{rss['cache_cap_mb']:.0f} + weights {rss['model_mb']:.0f} + {rss['allowance_mb']:.0f} = "
        f"{rss['bound_mb']:.0f} MB: {verdict} ({-parts['over_bound_mb']:+.0f} MB)"
    )
    if "rest_mb" in parts:
        cache = rss.get("cache_peak_mb", rss["cache_mb"])
        ok = "yes" if parts["rest_within_allowance"] else "NO"
        line += (
            f"\n  the peak = the server before its model (interpreter, torch, modules) {rss['baseline_mb']:.0f}"
            f" + weights {rss['model_mb']:.0f} + cache at its most {cache:.0f} (accounted; cap "
            f"{rss['cache_cap_mb']:.0f}) + the rest {parts['rest_mb']:.0f} MB (<= {rss['allowance_mb']:.0f}: {ok});"
            f" at the end: cache {rss['cache_mb']:.0f} + the rest {parts['rest_end_mb']:.0f} MB"
        )
    stages = {k[6:-3]: v for k, v in rss.items() if k.startswith("stage_")}
    if stages:
        line += "\n  RSS by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
        if rss.get("load_peak_mb"):
            line += f" (the load's peak {rss['load_peak_mb']:.0f})"
    if rss.get("runtime_mb") is not None:
        line += (
            f"\n  a fresh interpreter importing the server's modules (torch included), measured in this run:"
            f" {rss['runtime_mb']:.0f} MB"
        )
    return line
