"""Work ahead of the request (granite/focus, issue 15) through the real server on model/tiny.

Assertions are on the server's counters and on suggestions, never on elapsed time.
"""

from __future__ import annotations

import argparse
import time

from conftest import REPO, TINY, wait_stats
from jsonrpc_client import RpcClient

from granite_lsp.bench.trace import load_trace, run_mode

TASKS = REPO / "model" / "corpus" / "tasks.py"
OPTIONS = {"raw": True, "maxTokens": 8, "ignoreEos": True, "typeThrough": False}


def _wait_stats(rpc: RpcClient, pred, what: str) -> dict:
    return wait_stats(rpc, pred, what, timeout=120.0)


def _settled(rpc: RpcClient) -> dict:
    """Stats once no job runs or waits (work ahead is queued after a short debounce)."""
    time.sleep(0.3)
    return _wait_stats(rpc, lambda s: not s["worker"]["busy"], "idle")


def _focus(rpc: RpcClient, uri: str, line: int, character: int) -> None:
    rpc.notify("granite/focus", {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}})


def _where(text: str) -> tuple[int, int]:
    line = text[: text.index("def render")].count("\n")
    return line, 4 if text.splitlines()[line].startswith("    ") else 0


def _request(rpc: RpcClient, uri: str, line: int, character: int) -> tuple[str, int]:
    result = rpc.call("textDocument/inlineCompletion", rpc.inline_params(uri, line, character))
    items = (result or {}).get("items", [])
    return (items[0]["insertText"] if items else ""), rpc.call("granite/stats")["last"]["processed_tokens"]


def test_focus_makes_the_next_request_free_and_changes_no_suggestion(rpc: RpcClient) -> None:
    text = TASKS.read_text()
    line, character = _where(text)
    rpc.initialize(OPTIONS)
    rpc.open("file:///t.py", text)
    _focus(rpc, "file:///t.py", line, character)
    stats = _wait_stats(rpc, lambda s: s["background"].get("completed", 0) >= 1, "worked ahead")
    assert stats["background"]["tokens"] > 100
    ahead, processed = _request(rpc, "file:///t.py", line, character)
    assert processed == 0  # the whole prompt was processed ahead of the request

    plain = RpcClient()
    try:
        plain.initialize({**OPTIONS, "progressive": False})  # the full window, as after the work ahead
        plain.open("file:///t.py", text)
        cold, processed = _request(plain, "file:///t.py", line, character)
        assert processed > 100
    finally:
        plain.kill()
    assert ahead == cold


def test_work_ahead_is_dropped_when_the_document_changes_or_closes(rpc: RpcClient) -> None:
    text = TASKS.read_text()
    line, character = _where(text)
    rpc.initialize(OPTIONS)
    rpc.open("file:///t.py", text)
    _focus(rpc, "file:///t.py", line, character)
    rpc.change("file:///t.py", 2, (0, 0), (0, 0), "#")  # at line 0, not where the user typed: none follows
    rpc.open("file:///u.py", text)
    _focus(rpc, "file:///u.py", line, character)
    rpc.notify("textDocument/didClose", {"textDocument": {"uri": "file:///u.py"}})
    stats = _settled(rpc)
    assert stats["background"]["jobs"] == 2
    assert stats["background"].get("completed", 0) == 0 and stats["background"]["tokens"] == 0
    assert stats["worker"]["stale"] >= 2


def test_only_the_document_the_user_looks_at_gets_work_ahead(rpc: RpcClient) -> None:
    text = TASKS.read_text()
    line, character = _where(text)
    rpc.initialize(OPTIONS)
    for uri in ("file:///a.py", "file:///b.py"):
        rpc.open(uri, text)
    _focus(rpc, "file:///a.py", line, character)
    _focus(rpc, "file:///b.py", line, character)  # the user switched at once: a's work is not wanted
    stats = _wait_stats(rpc, lambda s: s["background"].get("completed", 0) >= 1, "worked ahead")
    stats = _settled(rpc)
    assert stats["background"]["jobs"] == 2 and stats["background"]["completed"] == 1
    _, processed = _request(rpc, "file:///a.py", line, character)
    assert processed > 100  # nothing was done for a


def test_work_ahead_changes_no_suggestion_on_every_step_of_a_trace() -> None:
    """The jump trace with its focus notifications and pauses, against the same trace without them (work
    ahead then only runs where the replay happens to leave a gap after a request). One window
    (progressive off), so that every answer is comparable; progressive context is test_progressive's."""
    trace = load_trace(REPO / "bench" / "traces" / "jump_and_back.jsonl")
    args = argparse.Namespace(
        model=str(TINY), random_weights="", max_tokens=8, ignore_eos=True, device="cpu", dtype="float32",
        quantize="none", threads=None, slow_steps=0, verbose=False, progressive=False,
    )  # fmt: skip
    ahead = run_mode("reuse", trace, args)
    plain = run_mode("reuse", [op for op in trace if op["op"] not in ("focus", "wait")], args)
    assert ahead["server_stats"]["background"]["tokens"] > 0
    assert [r["text"] for r in ahead["rows"]] == [r["text"] for r in plain["rows"]]
    assert len(ahead["rows"]) > 50
