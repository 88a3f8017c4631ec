"""Wall time of a benchmark step, the same way in every microbenchmark."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _sync() -> None:
    """Wait for queued GPU work, so wall times cover it (a no-op in a CPU-only process)."""
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up: on a shared machine other load only
    ever adds time, so the minimum is the least noisy estimate of what the code costs."""
    fn()
    samples = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - t0)
    return min(samples)
