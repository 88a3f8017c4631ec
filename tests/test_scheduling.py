"""Scheduling through the real server: latest wins, stale requests answered at once, cancellation
between decode steps, the prefetch after an accepted suggestion, early first lines.

No assertion here is on elapsed time: each is on the server's counters or the order of events.
The scheduler's own rules are tested in process in test_scheduler.py.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import expected_text, load_fixtures, single_line_fixture, wait_stats
from jsonrpc_client import RpcClient


def _wait_stats(rpc: RpcClient, pred, what: str) -> dict:
    return wait_stats(rpc, pred, what, timeout=60.0)


def _idle(rpc: RpcClient) -> dict:
    return _wait_stats(rpc, lambda s: not s["worker"]["busy"], "idle")


def test_burst_of_automatic_requests_runs_the_model_once(rpc: RpcClient) -> None:
    rpc.initialize()
    fixture = single_line_fixture()
    uri = "file:///burst.py"
    rpc.open(uri, fixture["text"])
    line, col = fixture["line"], fixture["character"]
    middle = fixture["middle"]
    ran_before = rpc.call("granite/stats")["worker"]["ran"]
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
        ids.append(rpc.request("textDocument/inlineCompletion", rpc.inline_params(uri, line, col + typed, True)))
        time.sleep(0.005)
    for msg_id in ids:
        rpc.wait(msg_id, timeout=60)
    # Every stale request is answered (null) before the current one, which alone ran the model.
    for msg_id in ids[:-1]:
        assert rpc.responses[msg_id].get("result") is None
        assert rpc.answered_at[msg_id] <= rpc.answered_at[ids[-1]]
    assert all(rpc.response_counts[m] == 1 for m in ids)
    stats = rpc.call("granite/stats")
    assert stats["worker"]["ran"] - ran_before == 1, stats["worker"]
    assert stats["worker"]["stale"] >= 49


def _start_long_generation(rpc: RpcClient, uri: str) -> int:
    """A request that would generate 4000 tokens, once its job is running."""
    rpc.initialize({"maxTokens": 4000, "ignoreEos": True, "raw": True})
    rpc.open(uri, "def f():\n    ")
    msg_id = rpc.request("textDocument/inlineCompletion", rpc.inline_params(uri, 1, 4))
    _wait_stats(rpc, lambda s: s["worker"]["busy"] and s["worker"]["ran"] >= 1, "running")
    return msg_id


def test_cancel_stops_generation_between_decode_steps(rpc: RpcClient) -> None:
    msg_id = _start_long_generation(rpc, "file:///long.py")
    rpc.notify("$/cancelRequest", {"id": msg_id})
    resp = rpc.wait(msg_id, timeout=30)
    assert resp.get("result") is None or resp["error"]["code"] == -32800
    # The worker stopped too (not just the response): idle again well before 4000 tokens.
    stats = _idle(rpc)
    assert stats["worker"]["cancelled_running"] >= 1
    assert stats["decoded_tokens"] < 4000


def test_newer_document_version_supersedes_a_running_request(rpc: RpcClient) -> None:
    msg_id = _start_long_generation(rpc, "file:///v.py")
    rpc.change("file:///v.py", 2, (1, 4), (1, 4), "x")
    assert rpc.wait(msg_id, timeout=30).get("result") is None
    stats = _idle(rpc)
    assert stats["worker"]["cancelled_running"] >= 1
    assert stats["decoded_tokens"] < 4000


@pytest.mark.parametrize("how", ["cancelRequest", "newer version"])
def test_a_stale_requests_prefill_stops_at_the_next_piece_and_keeps_its_work(rpc: RpcClient, how: str) -> None:
    """A request with a long prompt (~4,700 tokens, one window) made stale while its prefill runs: the
    prefill stops at its next piece (only decoding looked at staleness before), and the request that
    follows resumes from the checkpoint where it stopped."""
    rpc.initialize({"progressive": False, "prefixTokens": 20_000, "suffixTokens": 0, "maxTokens": 4})
    fixture = single_line_fixture()
    uri = "file:///long_prefill.py"
    head = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(250))
    rpc.open(uri, head + fixture["text"])
    line, col = head.count("\n") + fixture["line"], fixture["character"]
    msg_id = rpc.request("textDocument/inlineCompletion", rpc.inline_params(uri, line, col))
    _wait_stats(rpc, lambda s: s["cache"]["checkpoints_taken"] > 0, "prefilling")  # its first piece is done
    if how == "cancelRequest":
        rpc.notify("$/cancelRequest", {"id": msg_id})
    else:
        rpc.change(uri, 2, (line, col), (line, col), " ")  # the cursor's line: the prompt's head stays
    answer = rpc.wait(msg_id, timeout=120)
    assert answer.get("result") is None or answer["error"]["code"] == -32800
    stopped = _idle(rpc)
    assert stopped["cache"]["yields"] == 1, stopped["cache"]
    assert stopped["decoded_tokens"] == 0
    done = stopped["cache"]["tokens_processed"]
    follow = rpc.inline(uri, line, col + (how != "cancelRequest"), timeout=120)
    assert follow is not None
    last = rpc.call("granite/stats")["last"]
    assert done < last["prompt_tokens"]  # it stopped before the end of its prompt
    assert last["reused_tokens"] >= done  # and the next request resumed from there


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
    before = _wait_stats(
        rpc, lambda s: s["counters"].get("prefetches") and s["worker"]["ran"] >= 2 and not s["worker"]["busy"], "done"
    )
    assert before["counters"]["prefetches"] == 1
    end = col + len(item["insertText"].encode("utf-16-le")) // 2
    # The editor's own request after an accepted suggestion is automatic (an invoked one asks for
    # alternatives too, which takes the model: test_candidates.py).
    rpc.inline(uri, line, end, automatic=True)
    after = rpc.call("granite/stats")
    # Served from the prefetched suggestion (or nothing to suggest there): no new model run.
    assert after["cache"]["prefills"] == before["cache"]["prefills"]
    assert after["typed_through"] == before["typed_through"] + 1


def _tab_indented_block_end() -> tuple[str, int, int]:
    """tasks.py, indented with tabs, the cursor at the end of ``def finish(self) -> None:`` (the file's
    last line): the model writes the body indented with spaces, and more than one line of it."""
    fixture = next(f for f in load_fixtures() if f["file"].endswith("tasks.py") and f["middle"].startswith("return"))
    text = expected_text(fixture).replace("        ", "\t\t").replace("    ", "\t")
    line = next(i for i, ln in enumerate(text.split("\n")) if ln.startswith("\tdef finish"))
    return text, line, len(text.split("\n")[line])


def test_early_first_line_is_shaped_like_the_final_answer_in_process(make_service) -> None:
    """The early answer passes the same Shaper.finish as the final one (re-indentation here)."""
    from granite_lsp.documents import Document

    text, line, character = _tab_indented_block_end()
    cursor = Document("x", text).offset_at(line, character)
    progress = []
    final = make_service().complete("file:///tabs.py", text, cursor, on_progress=progress.append).suggestion
    early = next(p.first_line() for p in progress if p.first_line() is not None)
    assert early.text == '\n\t\tself.status = "done"'
    assert final.text.startswith(early.text + "\n") and early.replace == final.replace == 0


def test_early_first_line_is_shaped_like_the_final_answer(rpc: RpcClient) -> None:
    """A standard client gets the first line early; in a tab-indented buffer it used to come with the
    model's spaces, while the final answer (served after it from memory) had the buffer's tabs."""
    rpc.initialize()
    text, line, character = _tab_indented_block_end()
    rpc.open("file:///tabs.py", text)
    first = rpc.inline("file:///tabs.py", line, character)["items"][0]["insertText"]
    stats = _idle(rpc)
    # The whole suggestion, from the typing-through memory at the same place.
    whole = rpc.inline("file:///tabs.py", line, character)["items"][0]["insertText"]
    assert rpc.call("granite/stats")["typed_through"] == stats["typed_through"] + 1
    assert whole.startswith('\n\t\tself.status = "done"\n\t\t')
    # Early (the usual case) or, if the generation ended first, the final answer itself.
    assert first in ('\n\t\tself.status = "done"', whole)


def test_our_clients_with_streaming_off_get_the_first_line_early() -> None:
    """Our editors declare granitePartialCompletion whatever their streaming setting; with streaming off
    they show answers only, so the server treats them as standard clients and answers the first line
    early. It used to hold the early line back for any client declaring the capability, so such a user
    saw a long suggestion only once it was complete. Decoding slowed (failpoint slow-token) so that the
    first line is early."""
    client = RpcClient(env={"GRANITE_LSP_FAILPOINTS": "slow-token:100000"})
    try:
        client.initialize({"streaming": False}, capabilities={"experimental": {"granitePartialCompletion": True}})
        text, line, character = _tab_indented_block_end()
        client.open("file:///early.py", text)
        item = client.inline("file:///early.py", line, character, automatic=True)["items"][0]
        assert item["insertText"] == '\n\t\tself.status = "done"'
        assert client.call("granite/stats")["counters"]["early_first_line"] == 1
    finally:
        client.kill()


def test_accepting_an_early_first_line_keeps_the_rest_coming() -> None:
    """A standard client gets the first line early while the rest is generated; the user accepts it (the
    editor inserts the line, runs the item's command and asks again at its end). That edit used to make
    the generation stale: it stopped, and the request after the line ran the model again. The edit is
    typing through the suggestion, so the generation goes on and the request is served its rest from
    the typing-through memory. Decoding is slowed (failpoint slow-token) so that the first line is early."""
    client = RpcClient(env={"GRANITE_LSP_FAILPOINTS": "slow-token:100000"})
    try:
        client.initialize()
        text, line, character = _tab_indented_block_end()
        uri = "file:///accept_early.py"
        client.open(uri, text)
        item = client.inline(uri, line, character, automatic=True)["items"][0]
        first = '\n\t\tself.status = "done"'
        assert item["insertText"] == first
        before = client.call("granite/stats")
        assert before["counters"]["early_first_line"] == 1 and before["worker"]["busy"]
        client.change(uri, 2, (line, character), (line, character), first)
        client.call(
            "workspace/executeCommand", {"command": "granite.accepted", "arguments": item["command"]["arguments"]}
        )
        rest = client.inline(uri, line + 1, len(first) - 1, automatic=True)
        after = _idle(client)
        assert after["worker"]["cancelled_running"] == before["worker"]["cancelled_running"]  # it went on
        assert after["last"]["stop_reason"] == "typed_through"  # no model run for the request
        assert after["typed_through"] == before["typed_through"] + 1
        assert rest["items"][0]["insertText"].startswith("\n\t\t")  # the next lines of the same suggestion
    finally:
        client.kill()


def _accept_early_first_line(client: RpcClient, uri: str) -> tuple[int, str, dict]:
    """Open tasks.py, get the first line early (decoding slowed) and accept it as a standard client does:
    the edit inserting it, then the item's command. The line, the inserted text, the stats before."""
    text, line, character = _tab_indented_block_end()
    client.open(uri, text)
    item = client.inline(uri, line, character, automatic=True)["items"][0]
    first = '\n\t\tself.status = "done"'
    assert item["insertText"] == first
    before = client.call("granite/stats")
    assert before["counters"]["early_first_line"] == 1 and before["worker"]["busy"]
    client.change(uri, 2, (line, character), (line, character), first)
    client.call("workspace/executeCommand", {"command": "granite.accepted", "arguments": item["command"]["arguments"]})
    return line, first, before


def test_accepting_an_early_first_line_with_type_through_off_stops_the_generation() -> None:
    """With typeThrough off nothing is served from the typing-through memory, so accepting the early
    line must stop the job (it used to go on, and the request after the line waited behind it and then
    ran the model anyway)."""
    client = RpcClient(env={"GRANITE_LSP_FAILPOINTS": "slow-token:100000"})
    try:
        client.initialize({"typeThrough": False})
        uri = "file:///accept_early_off.py"
        line, first, before = _accept_early_first_line(client, uri)
        after_change = client.call("granite/stats")
        assert after_change["worker"]["cancelled_running"] == before["worker"]["cancelled_running"] + 1
        client.inline(uri, line + 1, len(first) - 1, automatic=True)
        after = _idle(client)
        assert after["typed_through"] == before["typed_through"]  # the model answered it, not the memory
    finally:
        client.kill()


def test_a_request_elsewhere_after_accepting_an_early_first_line_stops_the_generation() -> None:
    """The text still is the early line being typed through, but the next request is at another place:
    the generation's rest cannot answer it, so that request stops it instead of queueing behind it."""
    client = RpcClient(env={"GRANITE_LSP_FAILPOINTS": "slow-token:100000"})
    try:
        client.initialize()
        uri = "file:///accept_early_elsewhere.py"
        line, _, before = _accept_early_first_line(client, uri)
        assert client.call("granite/stats")["worker"]["cancelled_running"] == before["worker"]["cancelled_running"]
        client.inline(uri, line - 1, 0)  # invoked, on the line above
        after = _idle(client)
        assert after["worker"]["cancelled_running"] == before["worker"]["cancelled_running"] + 1
        assert after["typed_through"] == before["typed_through"]  # the model answered it, not the memory
    finally:
        client.kill()


def test_a_request_is_for_the_document_as_it_was_when_the_request_came(rpc: RpcClient) -> None:
    """A request and a change after it in one read: the request's handler (a coroutine) must see the
    document of its own moment, not the changed one, so the change makes it stale (answered null)
    instead of completing at the request's old position in the new text."""
    rpc.initialize()
    fixture = single_line_fixture()
    uri = "file:///order.py"
    rpc.open(uri, fixture["text"])
    line, col = fixture["line"], fixture["character"]
    assert rpc.inline(uri, line, col)["items"]  # the fixture's cursor has a suggestion

    def framed(message: dict) -> bytes:
        body = json.dumps(message).encode()
        return b"Content-Length: %d\r\n\r\n" % len(body) + body

    rpc._next_id += 1
    msg_id = rpc._next_id
    request = {"jsonrpc": "2.0", "id": msg_id, "method": "textDocument/inlineCompletion"}
    request["params"] = rpc.inline_params(uri, line, col)
    at = {"line": line, "character": 0}
    change = {
        "jsonrpc": "2.0",
        "method": "textDocument/didChange",
        "params": {
            "textDocument": {"uri": uri, "version": 2},
            "contentChanges": [{"range": {"start": at, "end": at}, "text": "x"}],  # the cursor moves right
        },
    }
    rpc.send_bytes(framed(request) + framed(change))
    assert rpc.wait(msg_id, timeout=60).get("result") is None
