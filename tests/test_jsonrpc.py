"""The server as a client that is not pygls sees it: plain JSON-RPC over the process's stdio."""

from __future__ import annotations

from conftest import single_line_fixture
from jsonrpc_client import RpcClient


def test_provider_completions_burst_cancel_and_clean_exit(rpc: RpcClient) -> None:
    result = rpc.initialize()
    assert "inlineCompletionProvider" in result["capabilities"]
    assert result["capabilities"]["experimental"]["granitePartialCompletion"] is True
    assert rpc.wait_notification("granite/status", lambda p: p["state"] == "ready")

    fixture = single_line_fixture()
    uri = "file:///w/fixture.py"
    rpc.open(uri, fixture["text"])
    answer = rpc.inline(uri, fixture["line"], fixture["character"])
    assert answer["items"][0]["insertText"] == fixture["middle"]
    assert answer["items"][0]["range"]["start"] == {"line": fixture["line"], "character": fixture["character"]}

    # A burst of automatic requests, as an editor fires per keystroke: every one answered, once.
    ids = [
        rpc.request(
            "textDocument/inlineCompletion", rpc.inline_params(uri, fixture["line"], fixture["character"], True)
        )
        for _ in range(20)
    ]
    for msg_id in ids:
        rpc.wait(msg_id, timeout=60)
    assert all(rpc.responses[i].get("result") is None for i in ids[:-1]), "superseded requests answer null"
    assert rpc.responses[ids[-1]]["result"]["items"][0]["insertText"] == fixture["middle"]

    # A cancelled request (another document) is answered too, with null or RequestCancelled.
    rpc.open("file:///w/other.py", fixture["text"])
    cancelled = rpc.request("textDocument/inlineCompletion", rpc.inline_params("file:///w/other.py", 0, 0))
    rpc.notify("$/cancelRequest", {"id": cancelled})
    rpc.wait(cancelled, timeout=60)
    rpc.sentinel("no-duplicates")  # answered in order: a duplicate owed before it would be out by now
    assert all(rpc.response_counts[i] == 1 for i in [*ids, cancelled])
    cancel_answer = rpc.responses[cancelled]
    assert cancel_answer.get("result") is None or cancel_answer["error"]["code"] == -32800

    stats = rpc.call("granite/stats")
    assert stats["worker"]["stale"] >= len(ids) - 1

    assert rpc.shutdown_and_exit() == 0


def test_exits_when_stdin_closes(rpc: RpcClient) -> None:
    rpc.initialize(wait_ready=False)
    rpc.proc.stdin.close()
    assert rpc.proc.wait(timeout=30) == 0
    assert "stdin closed: exiting" in rpc.stderr_text()  # it saw the end of its input (not killed by a timeout)
