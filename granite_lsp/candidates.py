"""Several candidates for one request, so that the editors' next/previous suggestion actually cycles.

The first candidate is the greedy completion, token for token the one ``Engine.generate`` gives (the
determinism the rest of the server relies on). The others branch off it at its first free choice: the
first position, or where token healing has reproduced the healed bytes (before that every choice is
constrained, and the constrained alternatives were whitespace runs); there they take the next-best
tokens instead and continue greedily. Each alternative gets a copy of the state (``StateCache.branches``,
counted against the cache's memory cap: fewer alternatives where they would not fit)
and all rows decode together (``StateCache.step_rows``): the projections and MLPs of a step read the
weights once for every row, which is what a step costs, so a few alternatives add little to the
greedy's own decode. The service asks for alternatives only where a batched row equals a single
step bit for bit (``StateCache.exact_rows``: the packed kernels); on the torch paths (GPU, MPS) rows
differ by a few 1e-6, so there it makes the one greedy candidate.

Alternatives stop like the greedy (end of text, ``max_tokens``, the post-processing rules through
``wants_more``), and at most ``ALTERNATIVE_EXTRA_TOKENS`` tokens after the greedy stopped: the answer
waits for every row, and a long alternative must not hold up a short greedy suggestion.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .engine import Engine, Generation, GenerationStats, TextSink
from .fim import FimPrompt
from .runtime import ModelState

# An alternative decodes at most this many tokens more than the greedy candidate did (see docstring).
ALTERNATIVE_EXTRA_TOKENS = 16
# One row per candidate wanted. Decoding spare rows (two per alternative) to make up for those dropped
# after post-processing (empty, the greedy text again in other tokens, loops) found no more on
# model/tiny's 14 fixtures (26 of 28 alternatives wanted either way), once alternatives branch after
# token healing rather than at the constrained first position (there most were whitespace runs).


@dataclass
class _Row:
    """One candidate being decoded: its state (None: the cache's live state) and its text so far."""

    state: ModelState | None
    pending: bytes  # the healed prefix bytes its tokens still have to reproduce
    token: int = -1  # chosen next, not yet taken
    ids: list[int] = field(default_factory=list)
    text: str = ""
    reason: str | None = None  # why it stopped; None while it decodes
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def take(self, piece: bytes) -> None:
        """Append the chosen token (whose bytes are ``piece``), minus what token healing removes."""
        self.ids.append(self.token)
        if self.pending:
            if piece.startswith(self.pending):
                piece, self.pending = piece[len(self.pending) :], b""
            else:
                piece, self.pending = b"", self.pending[len(piece) :]
        self.text += self.decoder.decode(piece)

    def branch(self, state: ModelState, token: int) -> _Row:
        """A row that has produced what this one has and chooses ``token`` next, on ``state``."""
        row = _Row(state, self.pending, token, list(self.ids), self.text)
        row.decoder.setstate(self.decoder.getstate())  # a character split between two tokens
        return row

    def stop(self, reason: str) -> None:
        self.reason = reason
        self.text += self.decoder.decode(b"", final=True)


def generate_candidates(
    engine: Engine,
    doc: str,
    prompt: FimPrompt,
    max_tokens: int,
    n: int,
    *,
    ignore_eos: bool = False,
    cancelled: Callable[[], bool] = lambda: False,
    on_text: TextSink | None = None,
    wants_more: TextSink | None = None,
) -> list[Generation]:
    """The greedy generation first (``on_text`` sees its text, as in ``Engine.generate``), then up to
    ``n - 1`` alternatives (``wants_more`` sees each one's text and returns False to stop it). An
    alternative may come out empty or equal to another: the caller shapes and filters them."""
    stats = GenerationStats()
    if cancelled():
        return [Generation("", [], "cancelled", stats)]
    cache = engine.cache
    pre = engine.prefill_request(doc, prompt, cancelled)
    stats.prompt_tokens, stats.reused_tokens = pre.prompt_tokens, pre.reused_tokens
    stats.processed_tokens, stats.prefill_ms = pre.processed_tokens, pre.prefill_ms
    if not pre.complete:
        return [Generation("", [], "cancelled", stats)]
    t0 = time.perf_counter()
    table = engine.tokenizer.token_bytes
    stop_ids = engine.tokenizer.control.stop_ids
    extra = ALTERNATIVE_EXTRA_TOKENS
    greedy = _Row(None, prompt.heal, engine._choose(pre.logits, prompt.heal, ignore_eos))
    rows, branched, logits = [greedy], n <= 1, pre.logits
    while True:
        if not branched and greedy.reason is None and not greedy.pending:
            # The first free choice (token healing done): the alternatives start here, each on a copy
            # of the live state, with the greedy's text so far.
            branched = True
            # Fewer where their state copies would not fit under the cache's cap (StateCache.branches).
            tokens = next_best(engine, logits, b"", greedy.token, n - 1)
            states = cache.branches(len(tokens), room=max_tokens - len(greedy.ids), protect=doc)
            rows += [greedy.branch(state, token) for token, state in zip(tokens, states, strict=False)]
        live = [r for r in rows if r.reason is None]
        if not live:
            break
        if cancelled():
            for r in live:
                r.stop("cancelled")
            break
        fed: list[_Row] = []
        for r in live:
            if r.token in stop_ids:
                r.stop("eos")
                continue
            r.take(table[r.token])
            sink = on_text if r is greedy else wants_more
            if sink is not None and not sink(r.text):
                r.stop("callback")
            elif len(r.ids) >= max_tokens:
                r.stop("max_tokens")
            elif r is not greedy and greedy.reason is not None and len(r.ids) >= len(greedy.ids) + extra:
                r.stop("max_tokens")
            else:
                fed.append(r)
        if not fed:
            break
        if len(fed) == 1 and fed[0] is greedy:  # the one-call step (kernels/step.cpp): same result
            step = cache.step(greedy.ids[-1]).unsqueeze(0)
        else:
            step = cache.step_rows([r.ids[-1] for r in fed], [r.state for r in fed])
        for r, row_logits in zip(fed, step, strict=True):
            r.token = engine._choose(row_logits, r.pending, ignore_eos)
            if r is greedy:
                logits = row_logits
    stats.decode_ms = (time.perf_counter() - t0) * 1000.0
    out = []
    for r in rows:
        row_stats = stats if r is greedy else GenerationStats()
        row_stats.generated_tokens = len(r.ids)
        out.append(Generation(r.text, r.ids, r.reason or "max_tokens", row_stats))
    return out


def next_best(engine: Engine, logits: torch.Tensor, pending: bytes, greedy: int, k: int) -> list[int]:
    """The ``k`` most likely first tokens after ``greedy``, best first: among those consistent with the
    healed prefix when there is one, never a stop token (an alternative that ends at once is empty)."""
    if k <= 0:
        return []
    logits = logits[: len(engine.tokenizer.token_bytes)]
    stop_ids = engine.tokenizer.control.stop_ids
    if pending:
        allowed = torch.tensor(engine.tokenizer.ids_consistent_with(pending), dtype=torch.long)
    else:
        allowed = torch.arange(logits.shape[0])
    want = min(allowed.numel(), k + 1 + len(stop_ids))
    order = allowed[torch.topk(logits[allowed], want).indices]
    return [t for t in order.tolist() if t != greedy and t not in stop_ids][:k]
