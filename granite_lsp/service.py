"""The completion pipeline shared by the LSP server, ``granite-lsp complete`` and the benchmark:
buffer + cursor -> FIM prompt -> model (with state reuse) -> shaped suggestion.

Keeping one pipeline is what makes the headless CLI a faithful stand-in for the editor path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import failpoints, memory
from .candidates import generate_candidates
from .engine import Engine, Generation, GenerationStats
from .fim import FimPrompt, PromptBuilder
from .memory import LEDGER
from .model_files import resolve_model_dir, resolve_tokenizer_dir
from .postprocess import CursorContext, Shaper, Suggestion
from .progressive import short_budget, use_short
from .remote_engine import RemoteEngine
from .runtime import HybridConfig, HybridModel
from .runtime.weights import random_state_dict
from .settings import Settings
from .state_cache import PrefillResult, StateCache
from .timeline import Timeline
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
    model: HybridModel | None  # None with a remote engine: only the tokenizer is local
    tokenizer: TextTokenizer
    path: Path
    device: str  # "remote" with a remote engine
    dtype: torch.dtype | None
    load_seconds: float
    reference: torch.nn.Module | None = None  # transformers' model, only for the benchmark's baseline


def load(settings: Settings, progress: Callable[[str, int], None] | None = None) -> LoadedModel:
    """Resolve and load the model named in ``settings``; raises ModelNotFound / UnsafeCheckpoint."""
    report = progress or (lambda message, percent: None)
    t0 = time.perf_counter()
    apply_threads(settings.threads)
    report(f"Locating {settings.model}", 0)
    if settings.engine == "remote":
        # The engine runs the model; the FIM prompt (our token ids) needs the tokenizer only.
        path = resolve_tokenizer_dir(settings.model, allow_download=settings.download)
        tokenizer = TextTokenizer.from_dir(path)
        report("Ready", 100)
        return LoadedModel(None, tokenizer, path, "remote", None, time.perf_counter() - t0)
    path = resolve_model_dir(settings.model, allow_download=settings.download)
    device = pick_device(settings.device)
    if device == "cpu":  # the one-time compile is announced in the editor's progress
        from . import kernels

        kernels.load(lambda message: report(message, 5))
        LEDGER.mark("kernels")
    dtype = pick_dtype(settings.dtype, device, HybridConfig.load(settings.random_weights or path).raw)
    quantize = None if settings.quantize == "none" else settings.quantize
    if quantize and device != "cpu":
        raise RuntimeError(f"--quantize {quantize} is CPU-only; on {device} use --dtype bfloat16 or float16")
    report("Loading tokenizer", 10)
    tokenizer = TextTokenizer.from_dir(path)
    tokenizer.prepare()
    LEDGER.mark("tokenizer")
    report(f"Loading weights ({device}, {str(dtype).removeprefix('torch.')})", 20)
    model, reference = _load_weights(settings, path, dtype, device, quantize)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    memory.release()  # conversion buffers
    LEDGER.ready()  # the weights are in: from here on the peak is the serving peak
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
        # Converted tensors leave the dict (their fp32 originals freed one by one) unless the twin needs them:
        # the real shape's bf16 load peaked at fp32 + bf16 (2.2 GB) with both kept.
        twin = settings.backend == "transformers"
        model = HybridModel.from_state_dict(
            cfg, weights, dtype=dtype, device=device, quantize=quantize, consume=not twin
        )
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
    # Other candidates, shaped like ``suggestion``: none empty, none equal to another or to it.
    alternatives: list[Suggestion] = field(default_factory=list)
    window: str = "full"  # the prompt window it was served from: "full" or "short" (progressive.py)


@dataclass(frozen=True)
class Progress:
    """A generation under way, as the request waiting on it may show it."""

    shown: str  # what the rules keep of the text so far (what streaming shows)
    shaper: Shaper | None  # None: raw output, no post-processing

    def first_line(self) -> Suggestion | None:
        """The first complete non-blank line, shaped exactly as the final answer is (``Shaper.finish``:
        re-indentation, the auto-closed-bracket merge), or None while there is none."""
        done = self.shown.split("\n")[:-1]
        first = next((i for i, line in enumerate(done) if line.strip()), None)
        if first is None:
            return None
        return _shaped(self.shaper, "\n".join(done[: first + 1]))


ProgressSink = Callable[[Progress], None]  # called on the model thread after every generated token


def _shaped(shaper: Shaper | None, text: str) -> Suggestion | None:
    """The one post-processing path of early and final answers."""
    if shaper is not None:
        return shaper.finish(text)
    return Suggestion(text, 0) if text else None


def _distinct(first: Suggestion | None, others: list[Suggestion | None]) -> list[Suggestion]:
    """The alternatives worth showing: not empty (nothing left after the rules, the repetition filter
    included) and not a duplicate of the first suggestion or of an earlier alternative."""
    seen = {(first.text, first.replace)} if first is not None else set()
    out: list[Suggestion] = []
    for s in others:
        if s is not None and s.text.strip() and (s.text, s.replace) not in seen:
            seen.add((s.text, s.replace))
            out.append(s)
    return out


@dataclass
class DocumentMemory:
    """What the model thread keeps of one open document, besides the state cache's checkpoints."""

    builder: PromptBuilder  # the prompt's anchor and window between requests
    short: PromptBuilder | None = None  # the short window's (progressive.py); None: progressive is off
    shown: SuggestionMemory = field(default_factory=SuggestionMemory)  # typing through its last suggestion

    def prompts(
        self, text: str, cursor: int, context_ids: list[int] | None, remember: bool
    ) -> tuple[FimPrompt, FimPrompt | None]:
        """The full window's prompt and the short one's (None when progressive is off). Both builders
        see every request, so each places its window exactly as a server with only that window would."""
        full = self.builder.build(text, cursor, context_ids, remember=remember)
        short = self.short.build(text, cursor, context_ids, remember=remember) if self.short else None
        return full, short


class CompletionService:
    """Holds the model, the state cache and each document's prompt memory.

    ``settings`` are those that calls without their own use (``granite-lsp complete``, tests); the server
    passes each job the settings current when it was submitted, so that there is one copy of them.
    """

    def __init__(
        self, loaded: LoadedModel, settings: Settings, on_engine_status: Callable[[str, str], None] | None = None
    ) -> None:
        self.loaded = loaded
        self.settings = settings
        self.cache: Any = None  # the in-process engine's state checkpoints (StateCache, or the bench's)
        self.engine: Engine | RemoteEngine
        if settings.engine == "remote":  # the one place where the engine is chosen
            self.engine = RemoteEngine(loaded.tokenizer, settings, on_engine_status)
        else:
            if loaded.reference is not None:
                from .bench.reference import TransformersCache

                self.cache = TransformersCache(loaded.reference)
            else:
                if loaded.model is None:
                    raise RuntimeError("the local engine needs the model's weights")
                self.cache = StateCache(loaded.model, max_bytes=settings.cache_mb << 20, enabled=settings.reuse)
            self.engine = Engine(loaded.tokenizer, self.cache, speculate=self._speculates(settings))
            self.engine.trail = settings.trail
        self._documents: dict[str, DocumentMemory] = {}
        self.typed_through = 0  # answers served from a document's last suggestion
        self.decoded_tokens = 0  # tokens generated over all calls, cancelled ones included

    def _apply(self, settings: Settings) -> None:
        """Settings that need no reload take effect at the next call (on the model thread)."""
        apply_threads(settings.threads)
        if self.cache is not None:
            self.cache.max_bytes = settings.cache_mb << 20
            self.cache.enabled = settings.reuse
        if isinstance(self.engine, Engine):
            self.engine.speculate = self._speculates(settings)
            self.engine.trail = settings.trail

    def _speculates(self, settings: Settings) -> bool:
        """Speculative decoding needs the runtime's state rollback (StateCache.verify/keep, not the
        bench's transformers reference), and only where it is exact (``_exact_rows``)."""
        return settings.speculate and self._exact_rows()

    def _exact_rows(self) -> bool:
        """Whether verified and batched rows equal single steps bit for bit (``StateCache.exact_rows``:
        the packed kernels). Elsewhere no speculation and one candidate: the output stays the single
        greedy answer, token for token."""
        return isinstance(self.cache, StateCache) and self.cache.exact_rows

    def document(self, doc: str, settings: Settings | None = None) -> DocumentMemory:
        """The document's memory; its prompt builder starts again when the budgets changed (the layout
        changes)."""
        settings = settings or self.settings
        budget = settings.budget()
        short = short_budget(budget) if self._progressive(settings) else None
        memory = self._documents.get(doc)
        if memory is None:
            memory = self._documents[doc] = DocumentMemory(PromptBuilder(self.loaded.tokenizer, budget))
        elif memory.builder.budget != budget:
            memory.builder = PromptBuilder(self.loaded.tokenizer, budget)
        if short is None:
            memory.short = None
        elif memory.short is None or memory.short.budget != short:
            memory.short = PromptBuilder(self.loaded.tokenizer, short)
        return memory

    def _progressive(self, settings: Settings) -> bool:
        """Progressive context needs the state cache: which window is ready is a question to it."""
        return settings.progressive and isinstance(self.cache, StateCache) and self.cache.enabled

    def _window(self, full: FimPrompt, short: FimPrompt | None) -> tuple[FimPrompt, str]:
        """The prompt a request is served from (the rule: ``progressive.use_short``)."""
        if short is None or short.ids == full.ids:
            return full, "full"
        cache = self.cache
        if use_short(cache.remaining(full.ids), cache.remaining(short.ids)):
            return short, "short"
        return full, "full"

    def forget(self, doc: str) -> None:
        self._documents.pop(doc, None)
        if self.cache is not None:
            self.cache.forget(doc)

    def prepare(
        self,
        doc: str,
        text: str,
        cursor: int,
        should_yield: Callable[[], bool],
        *,
        interrupt: Callable[[], bool] | None = None,
        settings: Settings | None = None,
        context_ids: list[int] | None = None,
    ) -> PrefillResult | None:
        """Work ahead of a request at ``cursor``: bring the state cache to its prompts, preemptibly (see
        ``Engine.prefill_ahead``), without changing the document's prompt memory: the short window's
        first (what a request can be served from soonest), then the full one's. None where the cache
        cannot work ahead (the bench's transformers baseline). The result sums both; ``complete``: both
        got to their end. ``interrupt``: a request waits (looked at between layers, StateCache.prefill)."""
        if not isinstance(self.engine, Engine) or not isinstance(self.cache, StateCache) or not self.cache.enabled:
            return None
        settings = settings or self.settings
        self._apply(settings)
        full, short = self.document(doc, settings).prompts(text, cursor, context_ids, remember=False)
        result: PrefillResult | None = None
        for prompt in [short, full] if short is not None and short.ids != full.ids else [full]:
            step = self.engine.prefill_ahead(doc, prompt, should_yield, interrupt)
            if result is not None:
                step.prompt_tokens += result.prompt_tokens
                step.reused_tokens += result.reused_tokens
                step.processed_tokens += result.processed_tokens
                step.prefill_ms += result.prefill_ms
            result = step
            if not step.complete:
                break
        return result

    def complete(
        self,
        doc: str,
        text: str,
        cursor: int,
        *,
        settings: Settings | None = None,
        max_tokens: int | None = None,
        max_lines: int | None = None,
        ignore_eos: bool = False,
        shape: bool | None = None,
        tab_size: int = 4,
        insert_spaces: bool | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        on_progress: ProgressSink | None = None,
        context_ids: list[int] | None = None,
        timeline: Timeline | None = None,
        candidates: int = 1,
    ) -> Completion:
        """Complete at ``cursor`` (a code-point offset into ``text``); ``timeline`` gets the request's
        moments: prompt built, first token, first token that adds text. With ``candidates`` > 1, up to
        that many suggestions in all (candidates.py; the first is the one a single candidate would be)."""
        if failpoints.fire("complete"):
            raise failpoints.InjectedFault("failpoint complete")
        settings = settings or self.settings
        self._apply(settings)
        memory = self.document(doc, settings)
        several = candidates > 1 and isinstance(self.engine, Engine) and self._exact_rows()
        remembered: list[Suggestion | None] = []  # a typing-through answer, to come first
        if settings.type_through:
            hit, cached = memory.shown.lookup(text, cursor)
            if hit:
                self.typed_through += 1
                kept = memory.shown.alternatives_at(text, cursor, candidates) if several else ()
                if kept is not None:  # typing through (one item), or asked again where they were made
                    gen = Generation("", [], "typed_through", GenerationStats())
                    return Completion(cached, gen, cursor, list(kept))
                # Asked for alternatives (cycling): the answer shown stays first, the model adds the others.
                remembered, on_progress = [cached], None
        full, short = memory.prompts(text, cursor, context_ids, remember=True)
        prompt, window = self._window(full, short)
        moments = timeline or Timeline()
        moments.mark("prompt")
        shape = not settings.raw if shape is None else shape
        ctx = CursorContext.at(text, cursor, tab_size, insert_spaces)
        shaper = Shaper(ctx, max_lines=max_lines or settings.max_lines) if shape else None
        tokens = [0]
        cache = self.cache if isinstance(self.cache, StateCache) else None  # counts its decode forwards
        forwards_before = cache.stats.decode_forwards if cache is not None else 0

        def on_text(so_far: str) -> bool:
            if failpoints.fire("slow-token"):
                time.sleep(0.03)  # a slow machine (tests: what is decoded after an early answer)
            tokens[0] += 1
            moments.mark("first_token")
            shown = shaper.preview(so_far) if shaper else so_far
            if shown and moments.steps_to_visible is None:
                moments.steps_to_visible = tokens[0]
                if cache is not None:
                    moments.forwards_to_visible = cache.stats.decode_forwards - forwards_before
                moments.mark("visible")
            elif moments.steps_to_visible is not None:
                moments.mark("decoded_on")  # the token after it: its partial was handed over before
            if on_progress is not None:
                on_progress(Progress(shown, shaper))
            return shaper is None or shaper.wants_more(so_far)

        budget = max_tokens if max_tokens is not None else settings.max_tokens
        ignore_eos = ignore_eos or settings.ignore_eos
        others: list[Generation] = []
        if several:
            assert isinstance(self.engine, Engine)
            wants_more = shaper.wants_more if shaper is not None else None
            gen, *others = generate_candidates(
                self.engine, doc, prompt, budget, candidates,
                ignore_eos=ignore_eos, cancelled=cancelled, on_text=on_text, wants_more=wants_more,
            )  # fmt: skip
        else:
            gen = self.engine.generate(doc, prompt, budget, ignore_eos=ignore_eos, cancelled=cancelled, on_text=on_text)
        LEDGER.mark("first completion", once=True)  # the first prefill's buffers and state included
        self.decoded_tokens += gen.stats.generated_tokens + sum(g.stats.generated_tokens for g in others)
        shaped = [_shaped(shaper, g.text) for g in [gen, *others]]
        suggestion, *alternatives = remembered + shaped
        kept_alternatives = _distinct(suggestion, alternatives)[: candidates - 1]
        if gen.stop_reason not in ("cancelled", "unavailable"):
            asked = candidates if several else 1
            memory.shown.remember(text, cursor, suggestion, tuple(kept_alternatives), asked)
        return Completion(suggestion, gen, cursor, kept_alternatives, window)
