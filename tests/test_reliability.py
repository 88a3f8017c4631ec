"""Issue 19 (Reliability II): one bad frame, one bad document or one stray client must not take the server
down. One test per class of failure, each through the real server process unless the class lives in
one module; framing (class 1) has its own file, test_framing.py, and document sync (class 4)
test_documents.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import TINY, single_line_fixture
from jsonrpc_client import RpcClient, server_command

from granite_lsp import parent_watch

NO_CAPS = {"processId": None, "rootUri": None, "capabilities": {}}


def _frame(message: dict | bytes) -> bytes:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def _stats_request(msg_id) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "granite/stats", "params": None}).encode()


# ---- 1. framing ------------------------------------------------------------------------------------------


def test_bad_content_length_is_answered_and_the_next_request_served(rpc: RpcClient) -> None:
    rpc.call("initialize", NO_CAPS)
    bad = [b"1000000000000", b"%d" % 2**63, b"12345678901234567890123456", b"10000000000", b"-5", b"twelve"]
    for n, value in enumerate(bad):
        rpc.send_bytes(b"Content-Length: " + value + b"\r\n\r\n" + _stats_request(f"bad-{n}"))
        assert "result" in rpc.sentinel(f"after-{n}"), value
        assert rpc.responses[f"bad-{n}"]["error"]["code"] == -32700, value  # its own id: it does not hang
    lenient = [b"content-length: %d\r\n\r\n", b"Content-Length:%d\r\n\r\n", b"Content-Length: %d\n\n"]
    for n, header in enumerate(lenient):
        body = _stats_request(f"lenient-{n}")
        rpc.send_bytes(header % len(body) + body)
        assert "result" in rpc.wait(f"lenient-{n}"), header
    assert rpc.proc.poll() is None


# ---- 2. TCP: one client ----------------------------------------------------------------------------------


class _Socket:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def send(self, message: dict | bytes) -> None:
        self.sock.sendall(_frame(message))

    def read(self) -> dict | None:
        """The next message, or None when the server closed the connection."""
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if sep:
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                if len(rest) >= length:
                    self.buf = rest[length:]
                    return json.loads(rest[:length])
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data

    def answer(self, msg_id) -> dict:
        while True:
            message = self.read()
            assert message is not None, f"connection closed before the answer to {msg_id}"
            if message.get("id") == msg_id and "method" not in message:
                return message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> _Socket:
    """A connection once the server listens (bounded: a server that exits or never listens fails)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _Socket(port)
        except ConnectionRefusedError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_tcp_serves_one_client_and_refuses_others_clearly() -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "granite_lsp", "--tcp", "--port", str(port), "--model", str(TINY)])
    try:
        first = _connect(port, proc)
        first.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": NO_CAPS})
        assert "result" in first.answer(1)
        # A second connection that sends garbage and closes: refused, and nothing else happens.
        stray = _Socket(port)
        stray.sock.sendall(b"\x00\xffgarbage\r\n\r\nContent-Length: 3\r\n\r\n{{{")
        refusal = stray.read()
        assert refusal["method"] == "window/showMessage" and "already serves a client" in refusal["params"]["message"]
        assert stray.read() is None
        stray.sock.close()
        # A second editor that tries to take over: refused the same way; the first keeps its session.
        other = _Socket(port)
        other.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": NO_CAPS})
        assert other.read()["method"] == "window/showMessage"
        assert other.read() is None
        first.send(_stats_request(2))
        stats = first.answer(2)["result"]
        assert stats["protocol"]["refused_connections"] == 2
        first.send({"jsonrpc": "2.0", "id": 3, "method": "shutdown"})
        assert first.answer(3).get("result") is None
        first.send({"jsonrpc": "2.0", "method": "exit"})
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


# ---- 3. one poisoned document ----------------------------------------------------------------------------


def test_a_document_with_lone_surrogates_affects_at_most_its_own_requests(rpc: RpcClient) -> None:
    rpc.initialize()  # context from other documents on (the default): the poisoned one is such context
    doc = {"uri": "file:///poison.py", "languageId": "python", "version": 1, "text": "s = 'X'\n"}
    body = json.dumps({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": doc}})
    rpc.send_raw(body.replace("X", "\\ud800").encode())  # JSON may carry a lone surrogate as an escape
    fixture = single_line_fixture()
    rpc.open("file:///clean.py", fixture["text"])
    params = rpc.inline_params("file:///clean.py", fixture["line"], fixture["character"])
    answer = rpc.wait(rpc.request("textDocument/inlineCompletion", params))
    assert "error" not in answer, answer
    assert answer["result"]["items"][0]["insertText"].strip()
    own = rpc.wait(rpc.request("textDocument/inlineCompletion", rpc.inline_params("file:///poison.py", 0, 6)))
    assert "error" not in own, own
    assert rpc.call("granite/stats")["counters"]["errors"] == 0


# ---- 4. a change that cannot be applied ------------------------------------------------------------------


def test_a_change_that_cannot_be_applied_stops_completions_until_the_whole_text_comes(rpc: RpcClient) -> None:
    """A change past the end of the document, or one that does not decode, means our copy is no longer
    the editor's: it used to be clamped or dropped with a log line, and completions went on at wrong
    places. Now the document is out of sync (one warning, null answers, later ranged changes ignored)
    until the editor sends the whole text again (a change without a range, or didOpen)."""
    rpc.initialize()
    fixture = single_line_fixture()
    uri = "file:///sync.py"
    rpc.open(uri, fixture["text"])
    line, col = fixture["line"], fixture["character"]
    assert rpc.inline(uri, line, col)["items"][0]["insertText"] == fixture["middle"]

    def warnings() -> list[str]:
        rpc.sentinel(f"warnings-{len(rpc.all_responses)}")  # everything sent before has been handled
        return [
            n["params"]["message"]
            for n in rpc.notifications
            if n["method"] == "window/showMessage" and n["params"]["type"] == 2
        ]

    lines = fixture["text"].count("\n") + 1
    rpc.change(uri, 2, (lines + 40, 0), (lines + 40, 0), "x = 1\n")  # past the end: made for another text
    assert len(warnings()) == 1 and uri in warnings()[0] and "past the end" in warnings()[0], warnings()
    assert rpc.inline(uri, line, col) is None
    rpc.change(uri, 3, (0, 0), (0, 0), "# ")  # a valid range, but of a text we do not have: ignored
    rpc.change(uri, 4, (lines + 41, 0), (lines + 41, 0), "y")
    assert len(warnings()) == 1  # one warning per loss of sync
    assert rpc.inline(uri, line, col) is None
    assert rpc.call("granite/stats")["counters"]["out_of_sync"] == 1

    rpc.notify(
        "textDocument/didChange",
        {"textDocument": {"uri": uri, "version": 5}, "contentChanges": [{"text": fixture["text"]}]},
    )
    assert rpc.inline(uri, line, col)["items"][0]["insertText"] == fixture["middle"]

    bad = {"range": {"start": {"line": 0}, "end": {"line": 0, "character": 0}}, "text": "x"}  # no character
    rpc.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 6}, "contentChanges": [bad]})
    assert len(warnings()) == 2 and "does not decode" in warnings()[1], warnings()
    assert rpc.inline(uri, line, col) is None
    rpc.open(uri, fixture["text"], version=7)  # the editor reopened it
    assert rpc.inline(uri, line, col)["items"][0]["insertText"] == fixture["middle"]
    assert rpc.call("granite/stats")["counters"]["errors"] == 0 and rpc.proc.poll() is None


# ---- 5. memory per notification, and the soak --------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def test_soak_fifty_thousand_changes_and_five_thousand_requests(rpc: RpcClient) -> None:
    """Through the real server on model/tiny: 50,000 didChange (typing and deleting), 5,000 requests
    (automatic completions, one explicit every 50, stats every 500). Every request is answered exactly
    once and RSS grows by less than 10 MB after a warm-up; pygls kept ~2 KB per notification before."""
    rpc.initialize({"maxTokens": 4})
    fixture = single_line_fixture()
    uri = "file:///soak.py"
    rpc.open(uri, fixture["text"])
    line, col = fixture["line"], fixture["character"]
    version = 1
    ids: list[int] = []
    rss_warm = 0.0
    for i in range(5_000):
        for k in range(10):
            version += 1
            if k % 2 == 0:
                rpc.change(uri, version, (line, col), (line, col), "x")
            else:
                rpc.change(uri, version, (line, col), (line, col + 1), "")
        if i % 500 == 499:
            ids.append(rpc.request("granite/stats"))
        else:
            params = rpc.inline_params(uri, line, col, automatic=i % 50 != 49)
            ids.append(rpc.request("textDocument/inlineCompletion", params))
        if i % 50 == 49:
            rpc.wait(ids[-1], timeout=120)  # a pause in typing now and then, as in an editor
        if i == 500:
            rpc.wait(ids[-1], timeout=120)
            rss_warm = _rss_mb(rpc.proc.pid)
    for msg_id in ids:
        rpc.wait(msg_id, timeout=120)
    stats = rpc.sentinel("soak")["result"]
    rss_end = _rss_mb(rpc.proc.pid)
    print(
        f"\nsoak: 50,000 didChange + {len(ids)} requests, all answered; RSS after warm-up {rss_warm:.1f} MB, "
        f"at the end {rss_end:.1f} MB (+{rss_end - rss_warm:.1f} MB); worker {stats['worker']}"
    )
    assert len(ids) == 5_000 and all(rpc.response_counts[i] == 1 for i in ids)
    assert all("error" not in rpc.responses[i] for i in ids)
    assert rss_end - rss_warm < 10.0


# ---- 7. every request answered, no phantom answers -------------------------------------------------------


def test_malformed_messages_get_their_json_rpc_answers(rpc: RpcClient) -> None:
    rpc.call("initialize", NO_CAPS)

    def null_id_answers() -> list[int]:
        return [r["error"]["code"] for r in rpc.all_responses if r.get("id") is None]

    rpc.send_raw(b'{"jsonrpc": "2.0", "id": 1, "method": ')  # not JSON
    rpc.sentinel("json")
    assert null_id_answers() == [-32700]
    rpc.send_raw(b'{"jsonrpc": "2.0", "id": "utf8", "method": "granite/stats", "params": {"x": "\xff\xfe"}}')
    assert rpc.wait("utf8")["error"]["code"] == -32700
    rpc.send_raw(b'{"id": "nojsonrpc", "method": "granite/stats", "params": null}')
    assert rpc.wait("nojsonrpc")["error"]["code"] == -32600
    whole = _stats_request("truncated")
    rpc.send_bytes(b"Content-Length: %d\r\n\r\n" % len(whole) + whole[:20])  # the rest never comes
    rpc.sentinel("truncated")
    assert null_id_answers() == [-32700, -32700]
    rpc.send_raw(b'{"jsonrpc": "2.0", "id": null, "method": "granite/stats", "params": null}')
    rpc.sentinel("null")
    assert null_id_answers() == [-32700, -32700, -32600]
    rpc.send_raw(b'{"jsonrpc": "2.0", "id": "noparams", "method": "granite/stats"}')
    assert "result" in rpc.wait("noparams")
    rpc.send_raw(b'{"jsonrpc": "2.0", "id": "unknown", "method": "granite/nothing"}')
    assert rpc.wait("unknown")["error"]["code"] == -32601
    # An object inside params shaped like a request is data, not a message: no answer to "phantom".
    nested = {"jsonrpc": "2.0", "id": "phantom", "method": "granite/stats", "params": None}
    rpc.send(
        {
            "jsonrpc": "2.0",
            "id": "outer",
            "method": "workspace/executeCommand",
            "params": {"command": "granite.accepted", "arguments": [nested]},
        }
    )
    assert "result" in rpc.wait("outer")
    rpc.sentinel("end")
    assert "phantom" not in rpc.responses
    assert all(count == 1 for msg_id, count in rpc.response_counts.items() if msg_id is not None)
    assert rpc.proc.poll() is None


# ---- 8. SIGINT during generation --------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_during_generation_ends_the_server(rpc: RpcClient) -> None:
    rpc.initialize(
        {"maxTokens": 4000, "ignoreEos": True, "raw": True},
        capabilities={"experimental": {"granitePartialCompletion": True}},
    )
    rpc.open("file:///long.py", "def f():\n    ")
    rpc.request("textDocument/inlineCompletion", rpc.inline_params("file:///long.py", 1, 4))
    rpc.wait_notification("granite/partialCompletion", lambda p: len(p["text"]) > 0)  # generating now
    rpc.proc.send_signal(signal.SIGINT)
    assert rpc.proc.wait(timeout=30) == 130


# ---- 10. processId ------------------------------------------------------------------------------------------


def test_invalid_process_ids_are_ignored_with_a_warning() -> None:
    for pid in (2**40, -12345678):
        rpc = RpcClient()
        try:
            rpc.call("initialize", {**NO_CAPS, "processId": pid})
            rpc.sentinel("watch")
            deadline = time.monotonic() + 30
            log = ""
            while "not a valid process id" not in log and time.monotonic() < deadline:
                log += rpc.stderr_text()
                time.sleep(0.05)
            assert f"processId {pid} is not a valid process id" in log, log
            assert "result" in rpc.sentinel("alive")
        finally:
            rpc.kill()


def test_liveness_check_tells_live_from_dead_processes() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert parent_watch.alive(os.getpid())
    assert not parent_watch.alive(child.pid)
    assert parent_watch.valid_pid(os.getpid()) == os.getpid()
    assert [parent_watch.valid_pid(p) for p in (None, 0, -1, 2**40, True, "12", 1.5)] == [None] * 7


# ---- 11. protocol details -----------------------------------------------------------------------------------


def test_life_cycle_rules() -> None:
    rpc = RpcClient()
    try:
        rpc.open("file:///early.py", "x = 1\n")  # before initialize: dropped (LSP)
        rpc.initialize()
        second = rpc.wait(rpc.request("initialize", NO_CAPS))
        assert second["error"]["code"] == -32600
        rpc.notify("initialized", {})  # a second one: no second model load
        stats = rpc.sentinel("lifecycle")["result"]
        assert stats["documents"] == 0
        assert stats["protocol"]["dropped_notifications"] == 2
        rpc.sentinel("settled")
        loads = [n for n in rpc.notifications if n["method"] == "granite/status" and n["params"]["state"] == "loading"]
        assert len(loads) == 1
        rpc.notify("exit")  # without shutdown
        assert rpc.proc.wait(timeout=30) == 1
    finally:
        rpc.kill()


def test_port_in_use_is_one_line_and_exit_code_two() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "granite_lsp", "--tcp", "--port", str(port), "--model", str(TINY)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        taken.close()
    assert out.returncode == 2
    assert out.stderr.strip() == f"granite-lsp: port {port} on 127.0.0.1 is already in use (another granite-lsp?)"


@pytest.mark.parametrize("debug", [False, True])
def test_internal_errors_carry_a_traceback_only_with_debug(debug: bool) -> None:
    cmd = server_command(*(["--debug"] if debug else []))
    rpc = RpcClient(cmd, env={"GRANITE_LSP_FAILPOINTS": "request-handler:1"})
    try:
        answer = rpc.wait(rpc.request("initialize", NO_CAPS))
        assert answer["error"]["code"] == -32603 and "failpoint" in answer["error"]["message"]
        assert ("traceback" in answer["error"].get("data", {})) == debug
    finally:
        rpc.kill()
