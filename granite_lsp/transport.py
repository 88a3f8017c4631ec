"""Byte streams in, framed bodies to the protocol: stdio, or one TCP client.

Replaces pygls' ``start_io``/``start_tcp`` loops, which (besides trusting the framing, see
:mod:`granite_lsp.framing`) read stdin on a pool thread that ``shutdown`` then waited for (an interrupted
server hung until the editor closed the pipe), served every TCP connection with the one protocol (a
second client took over the first one's session, and any connection that closed ended the server), and
dropped the ``exit`` notification's exit code.

A transport returns the process's exit code: the protocol's after ``exit`` (0 after ``shutdown``, else
1), 0 when the client closed the stream. The caller ends the process with it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from pygls.io_ import StdoutWriter

from .framing import DEFAULT_MAX_BODY, Body, Event, FrameParser

if TYPE_CHECKING:
    from .protocol import GraniteProtocol

log = logging.getLogger(__name__)

_READ_SIZE = 1 << 16
_READS_IN_FLIGHT = 8  # stdin chunks read ahead of the event loop (bounded memory when it is busy)


class PortInUse(OSError):
    """The TCP port is taken (another server?): reported in one line, not a traceback."""


class Connection:
    """One client's byte stream: frames it and feeds the protocol, one event at a time."""

    def __init__(self, protocol: GraniteProtocol, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.protocol = protocol
        self.parser = FrameParser(max_body)

    async def received(self, data: bytes) -> bool:
        """Handle ``data``; False once the protocol has been told to exit."""
        return await self._dispatch(self.parser.feed(data))

    async def closed(self) -> None:
        await self._dispatch(self.parser.eof())

    async def _dispatch(self, events: list[Event]) -> bool:
        protocol = self.protocol
        for event in events:
            if isinstance(event, Body):
                protocol.receive_body(event.data)
                # A coroutine handler (a completion request) only starts at the loop's next turn: let it
                # run up to its first wait before the next message, so that it sees the documents as they
                # were when it came, not as a didChange read in the same chunk made them.
                await asyncio.sleep(0)
            else:
                protocol.receive_framing_error(event.reason, event.body)
            if protocol.exit_code is not None:
                return False
        return True


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run the server's event loop until ``main`` returns. The loop is deliberately left open: the
    model thread may still post a result to it, and the caller ends the process right after."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(main)


def serve_stdio(protocol: GraniteProtocol, max_body: int = DEFAULT_MAX_BODY) -> int:
    protocol.set_writer(StdoutWriter(sys.stdout.buffer))
    return _run(_stdio(protocol, sys.stdin.fileno(), max_body))


async def _stdio(protocol: GraniteProtocol, fd: int, max_body: int) -> int:
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    credits = threading.Semaphore(_READS_IN_FLIGHT)

    def pump() -> None:
        # A daemon thread (not an executor's): blocked in read, it must never keep the process alive.
        while True:
            credits.acquire()
            try:
                data = os.read(fd, _READ_SIZE)
            except OSError as e:
                log.error("reading stdin failed: %s", e)
                data = b""
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, data)
            except RuntimeError:  # the loop is gone: the server is exiting
                return
            if not data:
                return

    threading.Thread(target=pump, name="granite-lsp stdin", daemon=True).start()
    connection = Connection(protocol, max_body)
    try:
        while True:
            data = await chunks.get()
            credits.release()
            if not data:
                await connection.closed()
                log.info("stdin closed: exiting")
                return 0 if protocol.exit_code is None else protocol.exit_code
            if not await connection.received(data):
                return protocol.exit_code or 0
    except BrokenPipeError:
        log.error("the client closed our stdout: exiting")
        return 0


def serve_tcp(protocol: GraniteProtocol, host: str, port: int, max_body: int = DEFAULT_MAX_BODY) -> int:
    """Listen on ``host:port`` for one client; the server ends when that client's connection does."""
    return _run(_tcp(protocol, host, port, max_body))


def refusal(message: str) -> bytes:
    """A framed ``window/showMessage`` (error) telling a client why it is not being served."""
    body = json.dumps(
        {"jsonrpc": "2.0", "method": "window/showMessage", "params": {"type": 1, "message": message}}
    ).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


async def _tcp(protocol: GraniteProtocol, host: str, port: int, max_body: int) -> int:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[int] = loop.create_future()
    serving: list[str] = []  # the one client's address, once connected

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _address(writer.get_extra_info("peername"))
        if serving or finished.done():
            protocol.counters["refused_connections"] += 1
            log.warning("refused a connection from %s: %s is already connected (one client per server)", peer, serving)
            try:
                writer.write(
                    refusal(
                        f"granite-lsp: this server already serves a client ({serving[0] if serving else 'exiting'}); "
                        "start another granite-lsp on another port for a second editor"
                    )
                )
                await writer.drain()
                writer.write_eof()
                # Read (and ignore) what it already sent before closing: closing a socket with unread
                # data resets the connection, and the client might never see why.
                await asyncio.wait_for(_drain(reader), timeout=2.0)
            except (ConnectionError, OSError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()
            return
        serving.append(peer)
        log.info("client connected from %s", peer)
        protocol.set_writer(writer)
        connection = Connection(protocol, max_body)
        code = 0
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    await connection.closed()
                    log.info("the client closed the connection: exiting")
                    break
                if not await connection.received(data):
                    break
            code = protocol.exit_code or 0
        except (ConnectionError, OSError) as e:
            log.error("connection to the client lost: %s", e)
        finally:
            if not finished.done():
                finished.set_result(code)

    try:
        server = await asyncio.start_server(on_connect, host, port)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise PortInUse(e.errno, f"port {port} on {host} is already in use (another granite-lsp?)") from e
        raise
    log.info("listening on %s", ", ".join(_address(s.getsockname()) for s in server.sockets))
    code = await finished
    server.close()
    return code


async def _drain(reader: asyncio.StreamReader, limit: int = 1 << 20) -> None:
    while limit > 0 and (data := await reader.read(_READ_SIZE)):
        limit -= len(data)


def _address(name: object) -> str:
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return str(name)
