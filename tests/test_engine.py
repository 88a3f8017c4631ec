"""Generation stops on EOS and on every control token, and never emits one as text."""

from __future__ import annotations

from granite_lsp.tokens import CONTROL_TOKENS


def test_stop_ids_are_every_control_token(tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    ids = {tok._tok.token_to_id(name) for name in CONTROL_TOKENS}
    assert tok.control.stop_ids == frozenset(ids) and len(ids) == 7
    assert all(tok.token_bytes[i] == b"" for i in ids)  # never text


def test_forced_long_generation_never_emits_a_control_token(make_service) -> None:
    svc = make_service(typeThrough=False)
    text = "def f():\n    "
    forced = svc.complete("file:///e.py", text, len(text), max_tokens=40, ignore_eos=True, shape=False)
    stop_ids = svc.loaded.tokenizer.control.stop_ids
    assert len(forced.generation.token_ids) == 40
    assert not stop_ids & set(forced.generation.token_ids)
    free = svc.complete("file:///e.py", text, len(text), max_tokens=400, shape=False)
    assert free.generation.stop_reason == "eos" and len(free.generation.token_ids) < 400
