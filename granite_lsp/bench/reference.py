"""transformers' own GraniteMoeHybrid as a generation backend: the baseline the benchmark compares to.

It processes the whole prompt on every request (transformers' hybrid cache cannot be rolled back), with
its own cache for the decode steps. Not used for serving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..state_cache import CacheStats, PrefillResult


@dataclass
class TransformersCache:
    """Same surface as StateCache (what Engine uses), backed by transformers."""

    model: torch.nn.Module
    enabled: bool = False
    max_bytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self._cache = None
        self._device = next(self.model.parameters()).device

    @torch.inference_mode()
    def prefill(self, doc: str, ids: list[int], marks: tuple[int, ...] = ()) -> PrefillResult:
        t0 = time.perf_counter()
        input_ids = torch.tensor([ids], device=self._device)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        self._cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        self.stats.prefills += 1
        self.stats.tokens_processed += len(ids)
        ms = (time.perf_counter() - t0) * 1000.0
        return PrefillResult(out.logits[0, -1].float(), len(ids), 0, len(ids), ms)

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        input_ids = torch.tensor([[token]], device=self._device)
        out = self.model(input_ids=input_ids, cache=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[0, -1].float()

    def forget(self, doc: str) -> None:
        pass

    def nbytes(self) -> int:
        return 0
