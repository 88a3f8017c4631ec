"""The real server's resident memory while ``granite-lsp bench`` replays a trace, against issue 15's bound.

VmRSS is sampled from /proc on a thread while the trace replays, because the peak the kernel keeps
(VmHWM, ``RpcClient.peak_rss_mb``) also holds the model load's transient peak (weights converted piece
by piece), which says nothing about a session with background work on. The bound for that session is
the state cache's cap + the model's weights + 100 MB (``rss_bound``), both read from the server's own
``granite/stats``. Kept apart from ``rss.py`` (the real-shape checkpoint's peak), which needs torch.
"""

from __future__ import annotations

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
    """Issue 15's memory bound from the server's own ``granite/stats``: cache cap + weights + 100 MB."""
    cap = (stats.get("cache") or {}).get("max_bytes", 0) / 2**20
    model = stats.get("model_bytes", 0) / 2**20
    bound = cap + model + allowance_mb
    return {"cache_cap_mb": cap, "model_mb": model, "allowance_mb": allowance_mb, "bound_mb": bound}
