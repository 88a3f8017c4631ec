"""Greedy generation of a FIM middle over the state cache, with token healing and early stopping.

Greedy, because a completion server must be deterministic: the same buffer and cursor give the same
suggestion, which is what makes typing-through, caching and the exactness tests possible.

The trail: what a generation decoded from a state (its tokens and the logits after each) holds again
the next time decoding starts from that same state. Typing inside a word sends the same prompt ids
every keystroke (fim.py withholds the word being typed, the heal), so the next request restores the
same end-of-prompt checkpoint and its first choices re-run the healing the previous request already
ran: with a longer heal, the allowed tokens are a subset of the previous ones, so each choice is the
previous one whenever that is still allowed. On the typing traces those healing tokens were most of the
time to the first visible text: a median of 2 tokens until one shows text, up to 8, each a decode
forward (~24 ms bf16) before anything shows. Along the trail the logits are known, so the choices need
no forward, and the first visible text goes out before any; the tokens taken from the trail are fed
with the first forward that leaves it (one verify with them in front: the same logits as steps, bit for
bit, on the packed kernels, ``StateCache.exact_rows``; one step each elsewhere). Exact: the same state
and the same tokens give the same logits, which the trail only remembers (``StateCache.origin`` says
when the live state is the trail's start, bit for bit).

A word typed to its end and followed by a boundary ("foo" then " ") puts the word into the prompt:
when it is one token and the last generation's first (``Engine._lead``), the prompt is the trail's
start plus that token, its logits are the trail's first row, and its one-token prefill (the same
arithmetic as the step that made that row) runs after the first choices, exactly as it would have
run before them. One trail is kept (the last generation's, at
most ``TRAIL_ROWS`` rows of vocabulary logits, ~0.4 MB each on the real shape: <= 6.4 MB, outside the
state cache's ``max_bytes``).
"""

from __future__ import annotations

import codecs
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .fim import FimPrompt
from .kernels import GEMV_MAX_ROWS
from .speculate import DraftBudget, DraftSource, PromptLookup, VerifyCost
from .state_cache import Checkpoint, PrefillResult, StateCache
from .tokens import TextTokenizer

TextSink = Callable[[str], bool]
"""Sees the whole text generated so far after every token; returns False to stop generating."""

# Rows of logits a trail keeps (module docstring): healing takes the first few tokens; a longer path
# serves a generation that follows the previous one further.
TRAIL_ROWS = 16


@dataclass
class _Trail:
    """The last generation's path from a checkpoint's state: the tokens fed after it, in order, and the
    logits after each (rows[i]: after tokens[: i + 1])."""

    origin: weakref.ref[Checkpoint]
    tokens: list[int]
    rows: list[torch.Tensor]


@dataclass
class _Path:
    tokens: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, tokens: list[int], rows: list[torch.Tensor]) -> None:
        """The first ``TRAIL_ROWS`` only (a long generation must not hold a row per token)."""
        room = max(0, TRAIL_ROWS - len(self.tokens))
        self.tokens += tokens[:room]
        # A verify's row keeps all of its rows' storage: kept alone, so that a trail holds its rows only.
        self.rows += [r.clone() if r.untyped_storage().nbytes() > r.nbytes else r for r in rows[: len(tokens)][:room]]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    processed_tokens: int = 0
    generated_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    # A remote engine's own count of prompt tokens served from its prefix cache (None: in process, or
    # the engine did not report it for this request).
    cached_tokens: int | None = None
    # Speculative decoding (speculate.py): decode forwards run (steps and verifies), draft tokens fed
    # in verifies, and drafts that became output (tokens per forward: generated / decode_forwards,
    # the first token coming from the prefill).
    decode_forwards: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    # Tokens chosen from the trail's logits (module docstring): no forward ran to choose them.
    trail_tokens: int = 0
    # The prompt ended with the trail's first token: its one-token prefill ran after the first choices.
    lead: bool = False

    @property
    def total_ms(self) -> float:
        return self.prefill_ms + self.decode_ms


@dataclass
class Generation:
    text: str  # the new text after the cursor (healed bytes already removed)
    token_ids: list[int]
    stop_reason: str  # "eos" | "max_tokens" | "cancelled" | "callback" | "unavailable" (remote engine down)
    stats: GenerationStats


class Engine:
    """Turns a FIM prompt into the middle's continuation, reusing model state through ``cache``."""

    def __init__(self, tokenizer: TextTokenizer, cache: StateCache, speculate: bool = True) -> None:
        self.tokenizer = tokenizer
        self.cache = cache
        # Draft tokens from the prompt and verify them several per forward (speculate.py); the
        # output is the same either way, only the number of forwards changes.
        self.speculate = speculate
        self.drafts: DraftSource = PromptLookup  # where drafts come from (tests force their own)
        self.costs = VerifyCost()  # how many drafts pay on this model and machine
        self._stop_ids = torch.tensor(sorted(tokenizer.control.stop_ids), dtype=torch.long)
        self.trail = True  # choose along the last generation's trail where it applies (module docstring)
        self._trail: _Trail | None = None  # the last generation's

    def generate(
        self,
        doc: str,
        prompt: FimPrompt,
        max_tokens: int,
        *,
        ignore_eos: bool = False,
        cancelled: Callable[[], bool] = lambda: False,
        on_text: TextSink | None = None,
    ) -> Generation:
        """Decode up to ``max_tokens`` tokens.

        ``cancelled`` is polled between decode steps; ``on_text`` sees the text so far after every token
        and returns False to stop (post-processing rules, streaming), so that no step is spent on text
        that will be thrown away.
        """
        stats = GenerationStats()
        if cancelled():
            return Generation("", [], "cancelled", stats)
        lead = self._lead(prompt)
        if lead is None:
            pre = self.prefill_request(doc, prompt, cancelled)
            stats.prompt_tokens, stats.reused_tokens = pre.prompt_tokens, pre.reused_tokens
            stats.processed_tokens, stats.prefill_ms = pre.processed_tokens, pre.prefill_ms
            if not pre.complete:
                return Generation("", [], "cancelled", stats)
            first = pre.logits
        else:
            first = lead.rows[0]  # the prompt's last token is the trail's first: its prefill waits (_lead)

        def settle() -> Checkpoint | None:
            """The prefill ``_lead`` put off, as it would have run first: restore, one token, checkpoint."""
            pre = self.prefill_request(doc, prompt, lambda: False)
            stats.prompt_tokens, stats.reused_tokens = pre.prompt_tokens, pre.reused_tokens
            stats.processed_tokens, stats.prefill_ms = pre.processed_tokens, pre.prefill_ms
            return self.cache.origin() if isinstance(self.cache, StateCache) else None

        t0 = time.perf_counter()
        table = self.tokenizer.token_bytes
        stop_ids = self.tokenizer.control.stop_ids
        pending = prompt.heal
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = ""
        ids: list[int] = []
        drafter = self.drafts(prompt.ids, stop_ids) if self.speculate else None
        budget = DraftBudget()
        # rows[j]: the logits after the last fed token and the first j of ``drafts`` (one verify
        # forward fed them all); row j + 1 counts only while the choices equal the drafts.
        rows: list[torch.Tensor] = [first]
        drafts: list[int] = []
        j, verify_ms = 0, 0.0
        reason = "max_tokens"
        # The trail (class docstring): while the choices follow it, its rows are the logits and no forward
        # runs; the tokens taken from it are fed (``unfed``) with the first forward off it.
        # ``base``: trail tokens the prompt itself ends with (1 with a lead, whose prefill is put off).
        deferred, base = lead is not None, int(lead is not None)
        stats.lead = deferred
        origin = None if deferred or not self.trail or not isinstance(self.cache, StateCache) else self.cache.origin()
        trail = lead if deferred else self._trail if origin is not None else None
        trail = trail if deferred or (trail is not None and trail.origin() is origin) else None
        on_trail = trail is not None
        unfed: list[int] = []
        walked = _Path()  # this generation's tokens after the start state and the logits after each
        fed_with: tuple[int, list[int], torch.Tensor] | None = None  # a verify's offset, tokens, rows
        while len(ids) < max_tokens:
            if cancelled():
                reason = "cancelled"
                break
            token = self._choose(rows[j], pending, ignore_eos)
            if token in stop_ids:
                reason = "eos"
                break
            ids.append(token)
            if drafter is not None:
                drafter.append(token)
            piece = table[token]
            if pending:
                if piece.startswith(pending):
                    piece, pending = piece[len(pending) :], b""
                else:
                    piece, pending = b"", pending[len(piece) :]
            text += decoder.decode(piece)
            if on_text is not None and not on_text(text):
                reason = "callback"
                break
            if len(ids) >= max_tokens:
                break
            if j < len(drafts) and token == drafts[j]:
                j += 1  # already fed by the verify: its logits are the next row
                stats.accepted_tokens += 1
                continue
            if drafts:
                assert fed_with is not None
                self._keep(drafts, j, budget, verify_ms, fed_with, walked)  # the fed token and the drafts kept
            n = len(ids) + base
            # The most tokens one forward may feed and stay bit-exact with steps is the one-call step's rows
            # (GEMV_MAX_ROWS): trail tokens, the token after them and the drafts go in one forward; a
            # longer one would run the prefill path (blocked GEMM, chunked scan), whose rounding differs.
            room = len(unfed) + 2 <= GEMV_MAX_ROWS  # this token and the next one still fit in one forward
            if on_trail and room and trail is not None and n <= len(trail.rows) and trail.tokens[n - 1] == token:
                row = trail.rows[n - 1]  # what feeding ``token`` would give: no forward
                unfed.append(token)
                walked.add([token], [row])
                rows, drafts, j = [row], [], 0
                stats.trail_tokens += 1
                continue
            on_trail = False
            if deferred:
                origin, deferred = settle(), False
            # Drafts only for tokens that could still be generated (each fed token precedes one).
            limit = (
                min(budget.next(), self.costs.limit(), max_tokens - len(ids) - 1, GEMV_MAX_ROWS - 1 - len(unfed))
                if drafter
                else 0
            )
            drafts = drafter.propose(limit) if drafter and limit > 0 else []
            j = 0
            stats.decode_forwards += 1
            t_fed = time.perf_counter()
            fed, offset, unfed = [*unfed, token, *drafts], len(unfed), []
            if drafts or (offset and self.cache.exact_rows):
                stats.draft_tokens += len(drafts)
                # Only tokens taken from the trail in front of ``token``: all stay, nothing to journal.
                every = self.cache.verify(fed) if drafts else self.cache.feed(fed)
                rows = list(every[offset:])
                verify_ms = (time.perf_counter() - t_fed) * 1000.0  # the forward alone, as a step is timed
                fed_with = (offset, fed, every)
                if not drafts:
                    walked.add([token], rows)
            else:
                for earlier in fed[:offset]:  # (not on the packed kernels: one step each, as they were made)
                    self.cache.step(earlier)
                rows = [self.cache.step(token)]
                walked.add([token], rows)
                if drafter is not None and not offset:
                    self.costs.observe_step((time.perf_counter() - t_fed) * 1000.0)
        if drafts:
            assert fed_with is not None
            self._keep(drafts, j, budget, verify_ms, fed_with, walked)  # as plain decoding would have left it
        if deferred:  # never left the trail: the prompt's checkpoint is taken all the same
            origin = settle()
        if origin is not None and not (on_trail and not base):
            self._trail = _Trail(weakref.ref(origin), walked.tokens, walked.rows)
        text += decoder.decode(b"", final=True)
        stats.generated_tokens = len(ids)
        # a lead's prefill ran inside the decode loop (settle): counted once, as prefill
        stats.decode_ms = (time.perf_counter() - t0) * 1000.0 - (stats.prefill_ms if lead is not None else 0.0)
        return Generation(text, ids, reason, stats)

    def _lead(self, prompt: FimPrompt) -> _Trail | None:
        """The trail, when ``prompt`` is its start plus its first token (a word typed to its end and a
        boundary after it, where that word was the token the last generation chose first) and a prefill
        would start from that very state: that one-token prefill (a forward exactly like the step that
        made the trail's first row) is then put off until a forward is needed anyway, after the first
        visible text. Two or more new tokens are prefilled together (not a step's arithmetic): no lead."""
        trail, cache = self._trail, self.cache
        if not self.trail or trail is None or not isinstance(cache, StateCache) or not trail.rows:
            return None
        origin = trail.origin()
        ids = prompt.ids
        if origin is None or len(ids) != origin.pos + 1 or ids[-1] != trail.tokens[0]:
            return None
        if cache.starts_from(ids) is not origin or not np.array_equal(origin.tokens, ids[:-1]):
            return None
        return trail

    def _keep(
        self,
        drafts: list[int],
        accepted: int,
        budget: DraftBudget,
        verify_ms: float,
        fed_with: tuple[int, list[int], torch.Tensor],
        walked: _Path,
    ) -> None:
        """After a verify (its forward took ``verify_ms``): keep the tokens taken from the trail in front
        of it, the fed token and the ``accepted`` drafts, and learn from it. The cost is the forward plus
        this rollback only, like a plain step's bare forward: choosing the tokens and ``on_text``
        (shaping, partials) cost the same either way (not learnt when trail tokens rode along)."""
        offset, fed, every = fed_with
        t0 = time.perf_counter()
        self.cache.keep(offset + accepted + 1)
        keep_ms = (time.perf_counter() - t0) * 1000.0
        walked.add(fed[offset : offset + accepted + 1], list(every[offset : offset + accepted + 1]))
        budget.update(len(drafts), accepted)
        if not offset:
            self.costs.observe_verify(len(drafts), accepted, verify_ms + keep_ms)

    def prefill_request(self, doc: str, prompt: FimPrompt, cancelled: Callable[[], bool]) -> PrefillResult:
        """A request's prefill: it stops at the next piece (``StateCache.request_chunk``) once ``cancelled()`` (the
        scheduler made the request stale, or preempted a prefetch), keeping the work done as a
        checkpoint for the request that superseded it; ``complete`` is False then. (The bench's
        transformers baseline stands in for the cache without pieces: it runs whole.)"""
        if not isinstance(self.cache, StateCache):
            return self.cache.prefill(doc, prompt.ids, marks=_marks(prompt))
        chunk = self.cache.request_chunk
        return self.cache.prefill(doc, prompt.ids, marks=_marks(prompt), should_yield=cancelled, chunk=chunk)

    def prefill_ahead(
        self,
        doc: str,
        prompt: FimPrompt,
        should_yield: Callable[[], bool],
        interrupt: Callable[[], bool] | None = None,
    ) -> PrefillResult:
        """Work ahead of a request: bring the state cache to the end of ``prompt`` (the checkpoints a
        request for it would restore), in pieces, stopping as soon as ``should_yield`` says so (between
        pieces) or ``interrupt`` does (between layers: a request waits). The work done is kept
        (``StateCache.prefill``); ``complete`` says whether it got to the end."""
        return self.cache.prefill(doc, prompt.ids, marks=_marks(prompt), should_yield=should_yield, interrupt=interrupt)

    def _choose(self, logits: torch.Tensor, pending: bytes, ignore_eos: bool) -> int:
        # The embedding may have rows past the tokenizer's vocabulary (padding): never pick those.
        logits = logits[: len(self.tokenizer.token_bytes)]
        if pending:
            allowed = torch.tensor(self.tokenizer.ids_consistent_with(pending), dtype=torch.long)
            return int(allowed[torch.argmax(logits[allowed])])
        if ignore_eos:
            logits = logits.clone()
            logits[self._stop_ids] = float("-inf")
        return int(torch.argmax(logits))


def _marks(prompt: FimPrompt) -> tuple[int, ...]:
    """Where the prompt's layout wants checkpoints (see state_cache's policy)."""
    return (prompt.context_len, prompt.prefix_len, prompt.static_len)
