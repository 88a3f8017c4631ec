"""transformers' own GraniteMoeHybrid as a generation backend: the baseline the trace bench compares to.

It processes the whole prompt on every request (transformers' hybrid cache cannot be rolled back), with
its own cache for the decode steps. Not used for serving: the server loads it only when the bench asks
for ``backend: transformers``, and ``transformers`` is then needed (``pip install 'granite-lsp[bench]'``),
not otherwise. Tests compare our runtime with transformers directly (tests/test_runtime.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..state_cache import CacheStats, PrefillResult


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError(
            "backend 'transformers' is the benchmark's baseline and needs transformers: "
            "pip install 'granite-lsp[bench]'"
        ) from e
    return transformers


def from_checkpoint(path: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """transformers' model of a checkpoint directory (safetensors only, no remote code)."""
    hf = _transformers().GraniteMoeHybridForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    model: torch.nn.Module = hf.to(device).eval()
    return model


def from_state_dict(
    config: dict[str, Any], state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, device: str
) -> torch.nn.Module:
    """transformers' model of ``config`` holding exactly ``state_dict`` (the weights our model got)."""
    t = _transformers()
    hf = t.GraniteMoeHybridForCausalLM(t.GraniteMoeHybridConfig(**config))
    missing, unexpected = hf.load_state_dict(dict(state_dict), strict=False)
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings", True) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"transformers' model does not take these weights: missing {missing}, extra {unexpected}")
    model: torch.nn.Module = hf.to(dtype=dtype, device=device).eval()
    return model


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
        logits: torch.Tensor = out.logits[0, -1].float()
        return logits

    def forget(self, doc: str) -> None:
        pass

    def nbytes(self) -> int:
        return 0
