"""A streaming HTTP POST that yields server-sent events, and can be abandoned at any moment.

Why not http.client or httpx: a completion request must stop within a poll interval when the editor
moves on (a newer keystroke makes it stale), also while the engine has not sent a byte yet (a request
queued behind other editors' work). Buffered socket files cannot resume after a read timeout, so this
reads the raw socket behind ``select`` with a short tick, checks ``cancelled`` on every tick, and closes
the connection to cancel: OpenAI-compatible engines (vLLM, llama.cpp's server) abort a request whose
client went away. Only what those engines send is handled: HTTP/1.1, chunked or length- or
close-delimited bodies, ``data:`` events.

Every wait is bounded and cancellable, not only the reads: the host name is resolved on a helper
thread (``getaddrinfo`` has no timeout of its own: a dead DNS server held a request, and the start's
``/models`` check, for as long as the system resolver liked) and the connect is non-blocking. An answer
read whole (an error's body, ``/models``) is read up to a size bound and within an overall deadline, so
an engine or proxy that sends a huge page, or trickles bytes just inside the silence timeout, cannot
hold the model thread or its memory.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import failpoints

TICK = 0.05  # seconds between two looks at ``cancelled`` while the engine is silent
ERROR_BODY_LIMIT = 64 << 10  # bytes of an error answer read for its message; the rest is not read
JSON_BODY_LIMIT = 1 << 20  # bytes of a JSON answer (``/models``) read at most


class EngineError(RuntimeError):
    """The engine could not be reached or answered with an error; ``retry`` says whether trying again may help."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class Cancelled(Exception):
    """``cancelled()`` became true: the connection was closed without waiting for the engine."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str  # the base path, e.g. "/v1"

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint must be an http:// or https:// URL, got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


class _Reader:
    """Bytes from a socket, waiting at most ``idle`` seconds for each piece and giving up when cancelled
    (or, with ``deadline``, a monotonic time, once it has passed: for answers read whole)."""

    def __init__(
        self, sock: socket.socket, idle: float, cancelled: Callable[[], bool], deadline: float | None = None
    ) -> None:
        self.sock, self.idle, self.cancelled, self.deadline = sock, idle, cancelled, deadline
        self.buf = b""
        self.eof = False

    def _fill(self) -> None:
        deadline = time.monotonic() + self.idle
        while True:
            if self.cancelled():
                raise Cancelled
            now = time.monotonic()
            if self.deadline is not None and now > self.deadline:
                raise EngineError(f"the engine's answer did not end within {self.idle:g} s", retry=False)
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if pending or select.select([self.sock], [], [], TICK)[0]:
                break
            if time.monotonic() > deadline:
                # Not retried within the request: a second wait as long would double the editor's.
                raise EngineError(f"no data from the engine for {self.idle:g} s", retry=False)
        try:
            data = self.sock.recv(65536)
        except OSError as e:
            raise EngineError(f"connection to the engine broke: {e}", retry=True) from e
        if not data:
            self.eof = True
        self.buf += data

    def until(self, marker: bytes) -> bytes:
        """Bytes up to and including ``marker``; at EOF whatever is left."""
        while marker not in self.buf:
            if self.eof:
                out, self.buf = self.buf, b""
                return out
            self._fill()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n and not self.eof:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def some(self) -> bytes:
        if not self.buf and not self.eof:
            self._fill()
        out, self.buf = self.buf, b""
        return out


AddrInfo = tuple[int, int, int, str, Any]  # getaddrinfo's (family, type, proto, canonname, sockaddr)


def _resolve(endpoint: Endpoint, timeout: float, deadline: float, cancelled: Callable[[], bool]) -> list[AddrInfo]:
    """``getaddrinfo`` on a helper thread, waited for until ``deadline`` or ``cancelled()``: the call
    itself cannot be interrupted, so a stalled lookup is left to finish on its own (daemon) thread."""
    answer: list[list[AddrInfo] | BaseException] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            if failpoints.fire("resolve-stall"):  # a DNS server that never answers (tests)
                time.sleep(60)
            answer.append(list(socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            answer.append(e)
        done.set()

    threading.Thread(target=lookup, name="granite-resolve", daemon=True).start()
    while not done.wait(TICK):
        if cancelled():
            raise Cancelled
        if time.monotonic() > deadline:
            raise EngineError(f"cannot resolve {endpoint.host}: no answer in {timeout:g} s", retry=False)
    result = answer[0]
    if isinstance(result, BaseException):
        reason = getattr(result, "strerror", None) or result
        raise EngineError(f"cannot resolve {endpoint.host}: {reason}", retry=True) from result
    return result


def _connect_one(info: AddrInfo, deadline: float, cancelled: Callable[[], bool]) -> socket.socket:
    """A non-blocking connect to one address, waited for in ticks; TimeoutError past ``deadline``."""
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        while err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            if cancelled():
                raise Cancelled
            if select.select([], [sock], [], TICK)[1]:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                break
            if time.monotonic() > deadline:
                raise TimeoutError
        if err:
            raise OSError(err, os.strerror(err))
        sock.setblocking(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect(endpoint: Endpoint, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> socket.socket:
    """A connection to the engine: resolving and connecting together within ``timeout``, cancellable."""
    deadline = time.monotonic() + timeout
    infos = _resolve(endpoint, timeout, deadline, cancelled)
    error: OSError | None = None
    for info in infos:
        try:
            sock = _connect_one(info, deadline, cancelled)
            break
        except TimeoutError as e:  # a black-holed address: not retried within the request (see _Reader)
            raise EngineError(f"cannot connect to {endpoint}: no answer in {timeout:g} s", retry=False) from e
        except OSError as e:
            error = e
    else:
        reason = (error.strerror or error) if error is not None else "no address"
        raise EngineError(f"cannot connect to {endpoint}: {reason}", retry=True) from error
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)  # the TLS handshake and sending; reads go through select
    if endpoint.scheme == "https":
        try:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=endpoint.host)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise EngineError(f"TLS with {endpoint} failed: {e}", retry=False) from e
    return sock


def _read_body(reader: _Reader, headers: dict[str, str], limit: int) -> tuple[bytes, bool]:
    """The body, or its first ``limit`` bytes and True when it is longer (the rest is not read)."""
    body = b""
    for chunk in _body_chunks(reader, headers):
        body += chunk
        if len(body) > limit:
            return body[:limit], True
    return body, False


def _cut_note(cut: bool, limit: int) -> str:
    return f" (only the first {limit >> 10} KB of the body were read)" if cut else ""


def _body_chunks(reader: _Reader, headers: dict[str, str]) -> Iterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = reader.until(b"\r\n")
            if not size_line:
                raise EngineError("the engine closed the connection in the middle of a response", retry=True)
            try:
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
            except ValueError as e:
                raise EngineError(f"the engine sent a bad chunk size {size_line[:40]!r}", retry=False) from e
            if size == 0:
                return
            data = reader.exactly(size)
            reader.exactly(2)  # CRLF after the chunk
            if len(data) < size:
                raise EngineError("the engine closed the connection in the middle of a response", retry=True)
            yield data
    elif "content-length" in headers:
        try:
            left = int(headers["content-length"])
        except ValueError as e:
            raise EngineError(
                f"the engine sent a bad Content-Length {headers['content-length'][:40]!r}", retry=False
            ) from e
        while left > 0:
            data = reader.some()
            if not data:
                raise EngineError("the engine closed the connection in the middle of a response", retry=True)
            left -= len(data)
            yield data
    else:
        while data := reader.some():
            yield data


def _exchange(
    endpoint: Endpoint,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str] | None,
    timeout: float,
    cancelled: Callable[[], bool],
    deadline: float | None = None,
) -> tuple[socket.socket, _Reader, dict[str, str]]:
    """Send the request and read the response head; raises EngineError unless the status is 200.

    ``deadline`` (monotonic) bounds the whole exchange, body included, where the answer is read whole."""
    payload = json.dumps(body).encode() if body is not None else b""
    head = [
        f"{method} {endpoint.path}{path} HTTP/1.1",
        f"Host: {endpoint.host}:{endpoint.port}",
        "Accept: text/event-stream, application/json",
        "Connection: close",
        *(["Content-Type: application/json", f"Content-Length: {len(payload)}"] if body is not None else []),
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    sock = _connect(endpoint, timeout, cancelled)
    try:
        try:
            sock.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + payload)
        except OSError as e:
            raise EngineError(f"sending to {endpoint} failed: {e}", retry=True) from e
        reader = _Reader(sock, timeout, cancelled, deadline)
        raw = reader.until(b"\r\n\r\n")
        if not raw.endswith(b"\r\n\r\n"):
            raise EngineError(f"{endpoint} closed the connection without answering", retry=True)
        lines = raw.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError) as e:
            raise EngineError(f"{endpoint} did not answer HTTP: {lines[0]!r}", retry=False) from e
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if status != 200:
            if reader.deadline is None:  # an error page is read whole: bound the time it may take too
                reader.deadline = time.monotonic() + timeout
            page, cut = _read_body(reader, fields, ERROR_BODY_LIMIT)
            message = _error_message(page.decode("utf-8", "replace")) + _cut_note(cut, ERROR_BODY_LIMIT)
            raise EngineError(
                f"{endpoint}{path} answered HTTP {status}: {message}", retry=status >= 500 or status in (408, 429)
            )
    except BaseException:
        sock.close()
        raise
    return sock, reader, fields


def get_json(
    endpoint: Endpoint,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
    cancelled: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """GET ``endpoint.path + path`` and parse the JSON answer (e.g. ``/models``): the whole exchange
    within ``timeout`` (and at most JSON_BODY_LIMIT bytes), given up when ``cancelled()``."""
    deadline = time.monotonic() + timeout
    sock, reader, fields = _exchange(endpoint, "GET", path, None, headers, timeout, cancelled, deadline)
    try:
        body, cut = _read_body(reader, fields, JSON_BODY_LIMIT)
    finally:
        sock.close()
    text = body.decode("utf-8", "replace")
    if cut:
        raise EngineError(f"{endpoint}{path} answered more than {JSON_BODY_LIMIT >> 10} KB", retry=False)
    try:
        answer = json.loads(text)
    except ValueError as e:
        raise EngineError(f"{endpoint}{path} did not answer JSON: {text[:100]!r}", retry=False) from e
    if not isinstance(answer, dict):
        raise EngineError(f"{endpoint}{path} did not answer a JSON object: {text[:100]!r}", retry=False)
    return answer


def post_events(
    endpoint: Endpoint,
    path: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    cancelled: Callable[[], bool] = lambda: False,
) -> Generator[str, None, None]:
    """POST ``body`` as JSON to ``endpoint.path + path`` and yield each server-sent event's data.

    ``timeout`` bounds the connect and every wait for bytes. Raises EngineError (unreachable, HTTP
    error, broken stream, timeout) or Cancelled; closing the generator closes the connection.
    """
    sock, reader, fields = _exchange(endpoint, "POST", path, body, headers, timeout, cancelled)
    try:
        pending = b""
        data: list[str] = []
        for chunk in _body_chunks(reader, fields):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                line = line.rstrip(b"\r")
                if not line:
                    if data:
                        yield "\n".join(data)
                        data = []
                elif line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" ").decode("utf-8", "replace"))
        if data:
            yield "\n".join(data)
    finally:
        sock.close()


def _error_message(text: str) -> str:
    """The engine's own words: OpenAI-style {"error": {"message": ...}} or the body's start."""
    try:
        err = json.loads(text).get("error")
        message = err.get("message") if isinstance(err, dict) else err
        if message:
            return str(message)[:300]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:300] or "(empty body)"
