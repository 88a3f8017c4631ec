"""Progressive context: which prompt window a request is served from (issue 15).

A request is served from one of two windows of the same FIM layout (fim.py), each with its own sticky
placement (its own ``PromptBuilder``):
- the **full** window (the ``prefixTokens``/``suffixTokens`` settings, ~1,600 tokens with the defaults);
- a **short** window near the cursor (``SHORT``: ~300 tokens), cheap enough to build from nothing during
  a 1 s pause (a quiet 2-core machine prefills ~330-400 tokens/s in bf16).

Work ahead (ahead.py) builds the short window first and then the full one. A request takes the full
window unless the short one saves it more than ``READY_TOKENS`` of prefill (``use_short``): before
the full window is built (a freshly opened file, a jump, an edit above) it is served from the short one,
and from the full one as soon as that is (nearly) built. Each suggestion is exact for the window it
used: the greedy continuation of that window's prompt, the same as a server configured with that
window's budgets would give for it.

Why these sizes. Issue 15's targets are a first answer <= 600 ms two seconds after opening a file and
after 1 s pauses (a jump, a paste above, an import added at the top), of which decoding 16 tokens
takes ~400 ms. So the prompt must be (nearly) processed within the pause: ~0.9 s of work ahead after
its 100 ms debounce, ~300-350 tokens. Hence 192 prefix tokens (~20 lines before the cursor's line) and
96 suffix tokens (~10 lines after it), plus the context in front of the file (shared with the full
window: same tokens, same checkpoints). ``READY_TOKENS`` is ~150 ms of prefill at that speed: the
wait a request accepts for the better context of the full window.

Why it keeps state reuse. The two windows begin at different places, so they are different token paths
in the state cache, each with its own checkpoints; each window's start is sticky (fim.py's
``window_slack``), so typing in either re-processes ~0 tokens, and an edit above the short window
leaves it intact (fim.py follows the moved text), which is what bounds an edit far above.
"""

from __future__ import annotations

from dataclasses import replace

from .fim import FimBudget

SHORT = FimBudget(prefix_tokens=192, suffix_tokens=96)
# Prefill tokens (~150 ms on a quiet 2-core machine, bf16) a request accepts to be served from the full
# window rather than the short one.
READY_TOKENS = 48


def short_budget(full: FimBudget) -> FimBudget | None:
    """The short window's budget for a full one, or None when the full window is no longer (nothing to gain)."""
    short = replace(
        full,
        prefix_tokens=min(full.prefix_tokens, SHORT.prefix_tokens),
        suffix_tokens=min(full.suffix_tokens, SHORT.suffix_tokens),
    )
    return None if short == full else short


def use_short(full_remaining: int, short_remaining: int) -> bool:
    """The one switching rule: serve the short window when the full one would cost more than
    ``READY_TOKENS`` prefill tokens beyond what the short one costs (tokens not covered by a checkpoint).

    Counted in tokens, not measured time, so that the choice is deterministic (tests, traces) and does
    not flap with the machine's load."""
    return full_remaining - short_remaining > READY_TOKENS
