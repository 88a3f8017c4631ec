"""The engine's trail (engine.py): a keystroke inside a word re-runs the previous request's token healing
from the same state; along the previous generation's path its logits are known, so the first visible
text needs no decode forward. The suggestions must be token for token those without the trail, and the
state cache must end up with the same checkpoints, on every decode path at every ISA level.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import REPO, TINY
from test_state_reuse import replay

from granite_lsp import kernels
from granite_lsp.runtime import HybridModel
from granite_lsp.service import CompletionService
from granite_lsp.settings import Settings

pytestmark = pytest.mark.usefixtures("isa_level")

TRACE = REPO / "bench" / "traces" / "type_short.jsonl"
OPTIONS = {
    "model": str(TINY),
    "prefixTokens": 384,
    "suffixTokens": 96,
    "maxTokens": 12,
    "ignoreEos": True,
    "raw": True,
    "typeThrough": False,  # every keystroke runs the model
    "progressive": False,
}


def _service(tiny_loaded, model: HybridModel, trail: bool, speculate: bool) -> CompletionService:
    loaded = dataclasses.replace(tiny_loaded, model=model)
    service = CompletionService(loaded, Settings().updated({**OPTIONS, "speculate": speculate, "trail": trail}))
    assert service.engine.trail == trail
    return service


def _model(packed: bool) -> HybridModel:
    if packed and not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.build_error()}")
    return HybridModel.from_pretrained(TINY, packed=packed)


@pytest.mark.parametrize(
    ("packed", "speculate"), [(True, True), (True, False), (False, False)], ids=["packed", "packed-nospec", "torch"]
)
def test_the_trail_changes_no_suggestion_and_shows_text_with_fewer_forwards(
    tiny_loaded, isa_level: str, packed: bool, speculate: bool
) -> None:
    from conftest import _isa_levels

    from granite_lsp.timeline import Timeline

    if not packed and isa_level != _isa_levels()[0]:
        pytest.skip("the torch path does not use the kernels: one ISA level is enough")

    trace = [json.loads(line) for line in TRACE.read_text().splitlines()]
    model = _model(packed)
    on, off = _service(tiny_loaded, model, True, speculate), _service(tiny_loaded, model, False, speculate)
    before: list[int] = []
    after: list[int] = []
    mismatches: list[int] = []
    taken = leads = 0

    def check(uri: str, text: str, cursor: int) -> None:
        nonlocal taken, leads
        a_time, b_time = Timeline(), Timeline()
        a = on.complete(uri, text, cursor, timeline=a_time)
        b = off.complete(uri, text, cursor, timeline=b_time)
        if a.generation.token_ids != b.generation.token_ids:
            mismatches.append(len(after))
        taken += a.generation.stats.trail_tokens
        leads += a.generation.stats.lead
        # A put-off prefill is still reported as the one it is (what the bench and granite/stats show).
        assert a.generation.stats.processed_tokens == b.generation.stats.processed_tokens
        assert b.generation.stats.trail_tokens == 0
        assert a_time.steps_to_visible == b_time.steps_to_visible
        if b_time.forwards_to_visible is not None:
            assert a_time.forwards_to_visible is not None
            assert a_time.forwards_to_visible <= b_time.forwards_to_visible
            before.append(b_time.forwards_to_visible)
            after.append(a_time.forwards_to_visible)
        # The cache holds the same checkpoints either way (what later requests restore).
        assert [c.tokens.tolist() for c in on.cache.checkpoints] == [c.tokens.tolist() for c in off.cache.checkpoints]

    replay(trace, check)
    assert mismatches == [], f"the trail changed the completion at steps {mismatches}"
    assert len(after) > 50
    assert taken > 0
    assert leads > 0  # words ended with a boundary whose prefill waited (tiny: 8 on this trace)
    # Without the trail the healing tokens cost forwards before the first text (tiny: a median of 1, up
    # to 6); with it most keystrokes cost none (measured: 121 forwards in all -> 50 packed, 78 torch).
    before.sort(), after.sort()
    assert before[len(before) // 2] >= 1, before
    assert sum(after) < sum(before), (sum(after), sum(before))
    assert after[len(after) // 2] == 0, after


def test_a_keystroke_inside_a_word_chooses_its_healing_from_the_trail(tiny_loaded) -> None:
    """Typing one more letter of a word: same prompt ids, a longer heal; the previous request decoded
    the healing tokens from that very state, so choosing them again runs no forward."""
    from granite_lsp.timeline import Timeline

    service = _service(tiny_loaded, _model(kernels.available()), True, True)
    text = "def main():\n    for item in range(10):\n        print(ite"
    first = service.complete("file:///w.py", text, len(text))
    assert first.generation.stats.trail_tokens == 0  # nothing decoded from this state before
    text += "m"
    moments = Timeline()
    second = service.complete("file:///w.py", text, len(text), timeline=moments)
    assert second.generation.stats.processed_tokens == 0  # the same prompt: its checkpoint restored
    assert second.generation.stats.trail_tokens > 0
    assert moments.forwards_to_visible == 0
