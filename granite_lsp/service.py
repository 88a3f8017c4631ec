"""The completion pipeline shared by the LSP server, ``granite-lsp complete`` and the benchmark:
buffer + cursor -> FIM prompt -> model (with state reuse) -> shaped suggestion.

Keeping one pipeline is what makes the headless CLI a faithful stand-in for the editor path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import failpoints, memory
from .engine import Engine, Generation, GenerationStats
from .fim import PromptBuilder
from .model_files import resolve_model_dir
from .postprocess import CursorContext, Shaper, Suggestion
from .runtime import HybridConfig, HybridModel
from .runtime.weights import random_state_dict
from .settings import Settings
from .state_cache import StateCache
from .tokens import TextTokenizer
from .typing_through import SuggestionMemory

log = logging.getLogger(__name__)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError(
            "device 'mps' was requested but torch sees no Apple GPU (MPS needs macOS 12.3+ on Apple Silicon)"
        )
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(dtype: str, device: str, config: dict[str, Any] | None = None) -> torch.dtype:
    """The weights' precision. "auto": bfloat16 on CUDA; on CPU the checkpoint's own dtype
    (config.json "dtype"/"torch_dtype": Granite ships bfloat16) when the AVX2 kernels are
    there, float32 otherwise. bf16 weights with fp32 activations lose nothing against a bf16
    checkpoint, halve the bytes a decode step streams and the memory (measured figures: README).
    """
    if dtype != "auto":
        return _DTYPES[dtype]
    if device != "cpu":
        return torch.bfloat16
    config = config or {}
    stored = _DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or ""))
    if stored is None or stored == torch.float32:
        return torch.float32
    from . import kernels

    return stored if kernels.available() else torch.float32


_DEFAULT_THREADS = torch.get_num_threads()


def apply_threads(threads: int) -> None:
    """The ``threads`` setting (0: torch's default, all cores); process-wide, so set between jobs."""
    wanted = threads or _DEFAULT_THREADS
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@dataclass
class LoadedModel:
    model: HybridModel
    tokenizer: TextTokenizer
    path: Path
    device: str
    dtype: torch.dtype
    load_seconds: float
    reference: torch.nn.Module | None = None  # transformers' model, only for the benchmark's baseline


def load(settings: Settings, progress: Callable[[str, int], None] | None = None) -> LoadedModel:
    """Resolve and load the model named in ``settings``; raises ModelNotFound / UnsafeCheckpoint."""
    report = progress or (lambda message, percent: None)
    t0 = time.perf_counter()
    apply_threads(settings.threads)
    report(f"Locating {settings.model}", 0)
    path = resolve_model_dir(settings.model, allow_download=settings.download)
    device = pick_device(settings.device)
    if device == "cpu":  # the one-time compile is announced in the editor's progress
        from . import kernels

        kernels.load(lambda message: report(message, 5))
    dtype = pick_dtype(settings.dtype, device, HybridConfig.load(settings.random_weights or path).raw)
    quantize = None if settings.quantize == "none" else settings.quantize
    if quantize and device != "cpu":
        raise RuntimeError(f"--quantize {quantize} is CPU-only; on {device} use --dtype bfloat16 or float16")
    report("Loading tokenizer", 10)
    tokenizer = TextTokenizer.from_dir(path)
    tokenizer.prepare()
    report(f"Loading weights ({device}, {str(dtype).removeprefix('torch.')})", 20)
    model, reference = _load_weights(settings, path, dtype, device, quantize)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    memory.release()  # conversion buffers
    report("Ready", 100)
    return LoadedModel(model, tokenizer, path, device, model.weight_dtype, time.perf_counter() - t0, reference)


def _load_weights(
    settings: Settings, path: Path, dtype: torch.dtype, device: str, quantize: str | None
) -> tuple[HybridModel, torch.nn.Module | None]:
    """Our model, and transformers' twin of it when the bench asks for that backend (its baseline).

    ``random_weights``: a model of that configuration with random weights (speed does not depend on
    them); the twin gets exactly the same weights.
    """
    if settings.random_weights:
        cfg = HybridConfig.load(settings.random_weights)
        weights = random_state_dict(cfg)
        model = HybridModel.from_state_dict(cfg, weights, dtype=dtype, device=device, quantize=quantize)
    else:
        model = HybridModel.from_pretrained(path, dtype=dtype, device=device, quantize=quantize)
    if settings.backend != "transformers":
        return model, None
    from .bench import reference  # the bench's baseline: never imported when serving

    if settings.random_weights:
        return model, reference.from_state_dict(cfg.raw, weights, dtype, device)
    return model, reference.from_checkpoint(path, dtype, device)


@dataclass
class Completion:
    suggestion: Suggestion | None
    generation: Generation
    cursor: int


class CompletionService:
    """Holds the model, the state cache and each document's prompt memory."""

    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self.loaded = loaded
        self.settings = settings
        if loaded.reference is not None:
            from .bench.reference import TransformersCache

            self.cache = TransformersCache(loaded.reference)
        else:
            self.cache = StateCache(loaded.model, max_bytes=settings.cache_mb << 20, enabled=settings.reuse)
        self.engine = Engine(loaded.tokenizer, self.cache)
        self._builders: dict[str, PromptBuilder] = {}
        self.shown = SuggestionMemory()

    def configure(self, settings: Settings) -> None:
        """Apply settings that need no reload; budgets reset the prompt memory (the layout changes)."""
        if settings.budget() != self.settings.budget():
            self._builders.clear()
        apply_threads(settings.threads)
        self.cache.max_bytes = settings.cache_mb << 20
        self.cache.enabled = settings.reuse
        self.settings = settings

    def builder(self, doc: str) -> PromptBuilder:
        b = self._builders.get(doc)
        if b is None:
            b = self._builders[doc] = PromptBuilder(self.loaded.tokenizer, self.settings.budget())
        return b

    def forget(self, doc: str) -> None:
        self._builders.pop(doc, None)
        self.shown.forget(doc)
        self.cache.forget(doc)

    def complete(
        self,
        doc: str,
        text: str,
        cursor: int,
        *,
        max_tokens: int | None = None,
        max_lines: int | None = None,
        ignore_eos: bool = False,
        shape: bool | None = None,
        tab_size: int = 4,
        insert_spaces: bool | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        on_text: Callable[[str], None] | None = None,
        context_ids: list[int] | None = None,
    ) -> Completion:
        """Complete at ``cursor`` (a code-point offset into ``text``)."""
        if failpoints.fire("complete"):
            raise failpoints.InjectedFault("failpoint complete")
        shape = not self.settings.raw if shape is None else shape
        if self.settings.type_through:
            hit, cached = self.shown.lookup(doc, text, cursor)
            if hit:
                return Completion(cached, Generation("", [], "typed_through", GenerationStats()), cursor)
        prompt = self.builder(doc).build(text, cursor, context_ids)
        ctx = CursorContext.at(text, cursor, tab_size, insert_spaces)
        shaper = Shaper(ctx, max_lines=max_lines or self.settings.max_lines)

        def keep_going(so_far: str) -> bool:
            if on_text is not None:
                on_text(shaper.preview(so_far) if shape else so_far)
            return not shape or shaper.wants_more(so_far)

        gen = self.engine.generate(
            doc,
            prompt,
            max_tokens if max_tokens is not None else self.settings.max_tokens,
            ignore_eos=ignore_eos or self.settings.ignore_eos,
            cancelled=cancelled,
            on_text=keep_going,
        )
        if shape:
            suggestion = shaper.finish(gen.text)
        else:
            suggestion = Suggestion(gen.text, 0) if gen.text else None
        if gen.stop_reason != "cancelled":
            self.shown.remember(doc, text, cursor, suggestion)
        return Completion(suggestion, gen, cursor)
