"""The remote engine's waits and reads are bounded: a huge error page, an answer that trickles in just
inside the silence timeout, a DNS lookup that never returns, and a start-up ``/models`` check that a
newer configuration must not wait behind.

The engines are stand-ins on 127.0.0.1 (real socket servers that stall or send too much), in front of
the real tokenizer of model/tiny and, for the cancelled check, the real server process. No assertion is
on elapsed time: each is on what the engine reports; a thread join or a wait bounds a hang.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
from conftest import TINY
from jsonrpc_client import RpcClient, server_command

from granite_lsp import failpoints
from granite_lsp.fim import PromptBuilder
from granite_lsp.remote_engine import RemoteEngine
from granite_lsp.remote_http import ERROR_BODY_LIMIT
from granite_lsp.settings import Settings
from granite_lsp.tokens import TextTokenizer

HUGE = 100 << 20  # bytes of the error page the huge stand-in announces


class _StandIn:
    """Accepts connections on 127.0.0.1, reads each request's head, then runs ``behave(conn)``."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.behave = behave
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sent = 0  # bytes sent over all connections
        self.accepted = 0  # requests read
        self.request_read = threading.Event()
        self.closed_by_client = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/v1"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            fields = (ln.split(b":", 1) for ln in head.split(b"\r\n")[1:])
            length = next((int(v) for k, v in fields if k.strip().lower() == b"content-length"), 0)
            while len(body) < length:  # the whole request: unread bytes would make close() a reset
                body += conn.recv(65536)
            self.accepted += 1
            self.request_read.set()
            try:
                self.behave(conn)
            except OSError:
                self.closed_by_client.set()

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def close(self) -> None:
        self.sock.close()


def _huge_error(engine: _StandIn) -> Callable[[socket.socket], None]:
    def behave(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % HUGE)
        block = b"<html>" + b"x" * 65530
        sent = 0
        while sent < HUGE:
            engine.send(conn, block[: HUGE - sent])
            sent += len(block[: HUGE - sent])

    return behave


def _trickle(engine: _StandIn) -> Callable[[socket.socket], None]:
    """A 200 whose close-delimited body comes one byte per 0.1 s, never ending: each wait for bytes is
    well inside the timeout."""

    def behave(conn: socket.socket) -> None:
        engine.send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{")
        while True:
            time.sleep(0.1)
            engine.send(conn, b" ")

    return behave


def _silent(conn: socket.socket) -> None:
    """Reads the request and never answers, until the client goes away."""
    conn.recv(1)  # returns b"" (or raises) once the client closed the connection
    raise OSError("client closed")


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_dir(TINY)


def _remote(url: str, tokenizer: TextTokenizer, timeout_ms: int) -> RemoteEngine:
    settings = Settings(engine="remote", endpoint=url, remote_model="m", remote_timeout_ms=timeout_ms)
    return RemoteEngine(tokenizer, settings)


def _probe_bounded(remote: RemoteEngine) -> None:
    """The start-up check on a thread, joined with a bound on a hang (not a timing assertion)."""
    thread = threading.Thread(target=remote.probe, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the /models check did not end"


def test_a_huge_error_page_is_read_only_up_to_the_bound_and_the_error_says_so(tokenizer: TextTokenizer) -> None:
    engine = _StandIn(lambda conn: None)
    engine.behave = _huge_error(engine)
    try:
        remote = _remote(engine.url(), tokenizer, 5_000)
        prompt = PromptBuilder(tokenizer).build("def f(x):\n    return ", 21)
        gen = remote.generate("file:///a.py", prompt, 8)
        assert gen.stop_reason == "unavailable" and remote.health.down
        error = remote.stats.last_error
        assert "answered HTTP 500" in error and f"only the first {ERROR_BODY_LIMIT >> 10} KB" in error, error
        assert engine.closed_by_client.wait(30)  # the page was not read to its end: the client hung up
        assert engine.accepted == 3 and engine.sent < 3 * HUGE  # a 500 is tried three times (RETRIES)
    finally:
        engine.close()


def test_a_models_answer_that_trickles_in_forever_ends_the_check(tokenizer: TextTokenizer) -> None:
    engine = _StandIn(lambda conn: None)
    engine.behave = _trickle(engine)
    try:
        remote = _remote(engine.url(), tokenizer, 1_000)
        _probe_bounded(remote)
        assert remote.health.down
        assert "did not end within 1 s" in remote.stats.last_error, remote.stats.last_error
    finally:
        engine.close()


def test_a_dns_lookup_that_never_returns_is_bounded_by_the_timeout(tokenizer: TextTokenizer) -> None:
    """``getaddrinfo`` has no timeout: the failpoint holds it as a dead DNS server would (it cannot be
    provoked from here otherwise); the check ends with the reason after remoteTimeoutMs."""
    engine = _StandIn(lambda conn: None)
    try:
        remote = _remote(engine.url("localhost"), tokenizer, 1_000)
        failpoints.arm("resolve-stall")
        _probe_bounded(remote)
        assert remote.health.down
        assert "cannot resolve localhost: no answer in 1 s" in remote.stats.last_error, remote.stats.last_error
        # The next try resolves for real and reaches the stand-in.
        assert not failpoints.armed("resolve-stall")
    finally:
        failpoints.arm("resolve-stall", 0)
        engine.close()


def test_a_new_configuration_does_not_wait_behind_a_stalled_start_up_check() -> None:
    """The engine accepts the start's /models request and never answers (the timeout is 10 minutes):
    a configuration change that reloads gives up that check and loads at once; the new load's own
    check ends after its 1 s timeout with the reason."""
    engine = _StandIn(_silent)
    client = RpcClient(
        server_command("--engine", "remote", "--endpoint", engine.url(), "--remote-model", "m")
        + ["--remote-timeout-ms", "600000"]
    )
    try:
        client.initialize({"debounceMs": 0}, wait_ready=False)
        assert engine.request_read.wait(60)  # the start's check is waiting for the engine
        client.notify("workspace/didChangeConfiguration", {"settings": {"granite": {"remoteTimeoutMs": 1000}}})
        status = client.wait_notification("granite/status", lambda p: p["state"] in ("ready", "error"), timeout=60)
        assert status["params"]["state"] == "error"
        assert "no data from the engine for 1 s" in status["params"]["message"], status
        assert engine.accepted == 2  # the first check's and the new load's
        assert client.call("granite/stats")["model_loaded"]
    finally:
        client.kill()
        engine.close()
