"""The real server's resident memory while ``granite-lsp bench`` replays a trace, against issue 15's bound.

VmRSS is sampled from /proc on a thread while the trace replays, because the peak the kernel keeps
(VmHWM, ``RpcClient.peak_rss_mb``) also holds the model load's transient peak (weights converted piece
by piece), which says nothing about a session with background work on. The bound for that session is
the state cache's cap + the model's weights + 100 MB (``rss_bound``), both read from the server's own
``granite/stats``. Kept apart from ``rss.py`` (the real-shape checkpoint's peak), which needs torch.
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
    and what the cache held when the stats were taken (``cache_mb``)."""
    cache = stats.get("cache") or {}
    cap = cache.get("max_bytes", 0) / 2**20
    model = stats.get("model_bytes", 0) / 2**20
    bound = cap + model + allowance_mb
    return {
        "cache_cap_mb": cap, "cache_mb": cache.get("bytes", 0) / 2**20, "model_mb": model,
        "allowance_mb": allowance_mb, "bound_mb": bound,
    }  # fmt: skip


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


def report_line(rss: dict[str, float]) -> str:
    """The replay's RSS against the bound, and what lies above weights + cache (interpreter, torch, work)."""
    verdict = "within" if rss["peak_mb"] <= rss["bound_mb"] else "OVER"
    line = (
        f"server RSS during the replay: peak {rss['peak_mb']:.0f} MB (start {rss['start_mb']:.0f}, end "
        f"{rss['end_mb']:.0f}; {rss['samples']:.0f} samples); bound: cache cap {rss['cache_cap_mb']:.0f} + weights "
        f"{rss['model_mb']:.0f} + {rss['allowance_mb']:.0f} = {rss['bound_mb']:.0f} MB: {verdict} "
        f"({rss['bound_mb'] - rss['peak_mb']:+.0f} MB)"
    )
    other = rss["end_mb"] - rss["model_mb"] - rss["cache_mb"]
    line += f"\n  at the end: weights {rss['model_mb']:.0f} + cache {rss['cache_mb']:.0f} + the rest {other:.0f} MB"
    if rss.get("runtime_mb") is not None:
        line += (
            f" (of which a bare interpreter with the server's imports, torch included: {rss['runtime_mb']:.0f} MB,"
            f" measured in this run)"
        )
    return line
