"""Scheduling: latest wins, stale requests answered at once, cancellation between decode steps."""

from __future__ import annotations

import time

from conftest import single_line_fixture
from jsonrpc_client import RpcClient


def test_burst_of_automatic_requests_runs_the_model_once(rpc: RpcClient) -> None:
    rpc.initialize()
    fixture = single_line_fixture()
    uri = "file:///burst.py"
    rpc.open(uri, fixture["text"])
    line, col = fixture["line"], fixture["character"]
    middle = fixture["middle"]
    ran_before = rpc.call("granite/stats")["worker"]["ran"]
    sent_at: dict[int, float] = {}
    ids: list[int] = []
    # Type the first characters of the middle and back, 50 keystrokes, a request after each.
    for i in range(50):
        k = i % 4
        version = i + 2
        if i % 8 < 4:
            rpc.change(uri, version, (line, col + k), (line, col + k), middle[k])
        else:
            rpc.change(uri, version, (line, col + 4 - k - 1), (line, col + 4 - k), "")
        typed = (k + 1) if i % 8 < 4 else (4 - k - 1)
        msg_id = rpc.request("textDocument/inlineCompletion", rpc.inline_params(uri, line, col + typed, automatic=True))
        now = time.monotonic()
        if ids:
            sent_at[ids[-1]] = now  # the previous request became stale now
        ids.append(msg_id)
        time.sleep(0.005)
    answered_at: dict[int, float] = {}
    for msg_id in ids:
        rpc.wait(msg_id, timeout=60)
    # Response arrival times: the reader thread stamps nothing, so re-check latency by polling order:
    # every stale request must already be answered shortly after the next one was sent.
    for msg_id in ids[:-1]:
        assert rpc.responses[msg_id].get("result") is None
        answered_at[msg_id] = rpc.answered_at[msg_id]
    late = {m: answered_at[m] - sent_at[m] for m in ids[:-1] if answered_at[m] - sent_at[m] > 0.05}
    assert not late, f"stale requests answered late: {late}"
    assert all(rpc.response_counts[m] == 1 for m in ids)
    stats = rpc.call("granite/stats")
    assert stats["worker"]["ran"] - ran_before == 1, stats["worker"]
    assert stats["worker"]["stale"] >= 49


def _start_long_generation(rpc: RpcClient, uri: str) -> int:
    """A request that would generate 4000 tokens, given time to get going."""
    rpc.initialize({"maxTokens": 4000, "ignoreEos": True, "raw": True})
    rpc.open(uri, "def f():\n    ")
    msg_id = rpc.request("textDocument/inlineCompletion", rpc.inline_params(uri, 1, 4))
    time.sleep(1.0)
    return msg_id


def _wait_until_idle(rpc: RpcClient, timeout: float = 5.0) -> dict:
    """granite/stats once the model worker is idle (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while rpc.call("granite/stats")["worker"]["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return rpc.call("granite/stats")


def test_cancel_stops_generation_between_decode_steps(rpc: RpcClient) -> None:
    msg_id = _start_long_generation(rpc, "file:///long.py")
    t0 = time.monotonic()
    rpc.notify("$/cancelRequest", {"id": msg_id})
    resp = rpc.wait(msg_id, timeout=30)
    assert resp.get("result") is None or resp["error"]["code"] == -32800
    assert time.monotonic() - t0 < 1.0
    # The worker stopped too (not just the response): it is idle again well before 4000 tokens.
    stats = _wait_until_idle(rpc)
    assert not stats["worker"]["busy"]
    assert stats["worker"]["cancelled_running"] >= 1


def test_newer_document_version_supersedes_a_running_request(rpc: RpcClient) -> None:
    msg_id = _start_long_generation(rpc, "file:///v.py")
    t0 = time.monotonic()
    rpc.change("file:///v.py", 2, (1, 4), (1, 4), "x")
    assert rpc.wait(msg_id, timeout=30).get("result") is None
    assert time.monotonic() - t0 < 0.5


def test_accepting_prefetches_the_next_suggestion(rpc: RpcClient) -> None:
    rpc.initialize()
    fixture = single_line_fixture()
    uri = "file:///accept.py"
    rpc.open(uri, fixture["text"])
    line, col = fixture["line"], fixture["character"]
    item = rpc.inline(uri, line, col)["items"][0]
    assert item["command"]["command"] == "granite.accepted"
    # The editor applies the item, then runs its command.
    rpc.change(uri, 2, (line, col), (line, col), item["insertText"])
    rpc.call("workspace/executeCommand", {"command": "granite.accepted", "arguments": item["command"]["arguments"]})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = rpc.call("granite/stats")
        if stats["counters"].get("prefetches") and not stats["worker"]["busy"]:
            break
        time.sleep(0.05)
    before = rpc.call("granite/stats")
    assert before["counters"]["prefetches"] == 1
    end = col + len(item["insertText"].encode("utf-16-le")) // 2
    rpc.inline(uri, line, end)
    after = rpc.call("granite/stats")
    # Served from the prefetched suggestion (or nothing to suggest there): no new model run.
    assert after["cache"]["prefills"] == before["cache"]["prefills"]
    assert after["typed_through"] == before["typed_through"] + 1


def test_debounce_adapts_to_typing_speed() -> None:
    from granite_lsp.server import GraniteServer

    server = GraniteServer()
    uri = "file:///d.py"
    server.documents.open(uri, "x")
    assert server.debounce_seconds(uri) == server.settings.debounce_ms / 1000  # no rhythm known yet
    for _ in range(6):  # fast typing: 30 ms between keystrokes
        server.on_document_changed(uri, 0)
        time.sleep(0.03)
    fast = server.debounce_seconds(uri)
    assert 0.03 < fast <= 2 * server.settings.debounce_ms / 1000  # longer than the gap: the next key wins
    time.sleep(1.1)  # a pause ends the burst
    server.on_document_changed(uri, 0)
    assert server.debounce_seconds(uri) == server.settings.debounce_ms / 1000
