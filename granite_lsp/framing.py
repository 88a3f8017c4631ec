"""LSP base-protocol framing: ``Content-Length`` headers in front of JSON bodies, cut out of a byte stream.

A parser without I/O (bytes in, bodies and framing errors out), so that every transport shares it and
tests can throw millions of mutated bytes at it quickly. pygls' own reader trusts the stream: a huge
``Content-Length`` made it allocate until it died, and a header it did not recognise was skipped
silently, its body then read as the next header, which lost the next good message as well.

The rules here:

* Header names are case-insensitive, the space after the colon is optional and lines may end in LF
  alone, as lenient readers of HTTP-style headers do; unknown headers (``Content-Type``) are ignored.
* A ``Content-Length`` that is missing, not a number, negative or over ``max_body`` is a framing error.
  Its body cannot be delimited, so the parser *resynchronises*: it skips to the next ``Content-Length``
  in the stream. If what it skipped is one complete JSON value, that value is handed back with the
  error, so that a request in it can still be answered (with an error) instead of waiting forever.
* A body that turns out to contain the start of the next message (its ``Content-Length`` was too large
  for what the client actually sent) is cut there and the rest is parsed again; the cut-off part is a
  body like any other (the protocol answers it with a parse error).
* Memory is bounded: nothing over ``max_body`` plus one read is ever held, and an oversized body is
  discarded as it streams in rather than collected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

DEFAULT_MAX_BODY = 64 << 20  # 64 MiB: far above any real document, far below what hurts

_MARKER = re.compile(rb"content-length[ \t]*:", re.IGNORECASE)
_LENGTH = re.compile(rb"[ \t]*([0-9]+)[ \t]*")


@dataclass(frozen=True)
class Body:
    """One message body, exactly as framed."""

    data: bytes


@dataclass(frozen=True)
class FramingError:
    """Bytes that could not be framed. ``body`` holds a complete JSON value found in them, if any."""

    reason: str
    body: bytes | None = None


Event = Body | FramingError


class FrameParser:
    """Feed it bytes as they arrive; it returns the events they complete, in order."""

    def __init__(self, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._headers_seen = False  # inside a header block (some header line already read)
        self._length: int | None = None  # the body being read, once its header block is complete
        self._skip_reason: str | None = None  # resynchronising after this error
        self._scanned = 0  # how far the buffer has been searched for a marker (no quadratic rescans)
        self._floor = 0  # where the search for the next header may start (not at the bad one)
        self._length_value: bytes | None = None
        self.skipped_bytes = 0  # garbage thrown away while resynchronising (diagnostics)

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def eof(self) -> list[Event]:
        """The stream ended: report what was left half-way."""
        events = self.feed(b"")
        if self._length is not None:
            events.append(FramingError(f"the stream ended {len(self._buf)} bytes into a {self._length}-byte body"))
        elif self._skip_reason is not None:
            events.append(FramingError(self._skip_reason, _one_json_value(bytes(self._buf))))
        elif self._buf.strip():
            events.append(FramingError("the stream ended inside a header"))
        self._buf.clear()
        self._length = self._skip_reason = None
        self._headers_seen = False
        self._scanned = 0
        return events

    # ---- states ----------------------------------------------------------------------------------------

    def _step(self, events: list[Event]) -> bool:
        """Advance by one event or state change; False when more input is needed."""
        if self._skip_reason is not None:
            return self._resync(events)
        if self._length is not None:
            return self._body(events)
        return self._header(events)

    def _header(self, events: list[Event]) -> bool:
        buf = self._buf
        if not self._headers_seen:
            # Blank lines between messages are harmless.
            stripped = len(buf) - len(buf.lstrip(b"\r\n \t"))
            if stripped:
                del buf[:stripped]
            self._length_value = None
        nl = buf.find(b"\n", 0, _MAX_HEADER_LINE)
        if nl < 0:
            if len(buf) >= _MAX_HEADER_LINE or (buf and not _could_start_header(buf)):
                self._start_skip("bytes that are not an LSP header", 1)
                return True
            return False
        line = bytes(buf[:nl]).rstrip(b"\r")
        if not line:  # the blank line: the header block is complete
            del buf[: nl + 1]
            self._headers_seen = False
            value = self._length_value
            if value is None:
                self._start_skip("a header block without Content-Length")
                return True
            match = _LENGTH.fullmatch(value)
            if match is None:
                self._start_skip(f"an invalid Content-Length {_show(value)}")
                return True
            length = int(match.group(1))
            if length > self.max_body:
                # Never allocated. Whether the client really sent that much (then it is skipped as it
                # streams in) or the number is corrupt (then the next header follows soon), framing
                # resumes at the next header.
                self._start_skip(f"a Content-Length of {length} bytes, over the limit of {self.max_body}")
                return True
            self._length = length
            self._scanned = 0
            return True
        header = _HEADER_LINE.fullmatch(line)
        if header is None or _MARKER.search(line, 1):
            # The second case: a header cut short by the next message's (a partial line, then a new one).
            # Not a header: garbage before the next message (or a header block cut short by it).
            self._headers_seen = False
            self._start_skip("bytes that are not an LSP header", 1)
            return True
        del buf[: nl + 1]
        self._headers_seen = True
        if header.group(1).lower() == b"content-length":
            self._length_value = header.group(2)
        return True

    def _body(self, events: list[Event]) -> bool:
        buf, length = self._buf, self._length
        assert length is not None
        # The next message's header inside what was declared as this body: the length was too large
        # for what the client actually sent. Only a complete ``Content-Length: N`` line counts, and a
        # JSON body cannot hold one (strings have no raw line breaks), so a document that mentions it
        # is safe. Only the new bytes are searched, and only when they hold a line break at all.
        end = min(len(buf), length)
        start = max(0, self._scanned - _OVERLAP)
        nxt = _embedded_header(buf, start, end) if buf.find(b"\n", start) >= 0 else None
        self._scanned = end
        if nxt is None:
            if len(buf) < length:
                return False
            if len(buf) < length + _OVERLAP and _PARTIAL_HEADER.search(buf, max(0, length - _OVERLAP), length):
                return False  # it ends in what may be the start of the next header: see the next bytes
            nxt = length
        events.append(Body(bytes(buf[:nxt])))
        del buf[:nxt]
        self._length = None
        self._scanned = 0
        return True

    def _start_skip(self, reason: str, start: int = 0) -> None:
        self._skip_reason = reason
        self._scanned = self._floor = start

    def _resync(self, events: list[Event]) -> bool:
        buf = self._buf
        marker = _MARKER.search(buf, max(self._floor, self._scanned - _OVERLAP))
        if marker is None:
            self._scanned = max(self._scanned, len(buf))
            if len(buf) > self.max_body:  # never hold more than one body's worth of garbage
                drop = len(buf) - _OVERLAP
                self.skipped_bytes += drop
                del buf[:drop]
                self._scanned, self._floor = _OVERLAP, 0
            return False
        skipped = bytes(buf[: marker.start()])
        del buf[: marker.start()]
        self.skipped_bytes += len(skipped)
        events.append(FramingError(self._skip_reason or "unframed bytes", _one_json_value(skipped)))
        self._skip_reason = None
        self._scanned = 0
        return True


_MAX_HEADER_LINE = 1024  # a header line longer than this is garbage, not a header
_OVERLAP = 64  # rescanned bytes, so that a marker split across two reads is still found
# The beginning of a "Content-Length: N" line, cut off at the end of a body (no JSON object ends so).
_PARTIAL_HEADER = re.compile(
    rb"(?:%s)\Z|content-length[ \t]*(?::[ \t]*[0-9]*\r?)?\Z" % b"|".join(b"content-length"[:i] for i in range(1, 14)),
    re.IGNORECASE,
)
_HEADER_LINE = re.compile(rb"([A-Za-z0-9-]+)[ \t]*:[ \t]*(.*?)[ \t]*")


def _could_start_header(buf: bytearray) -> bool:
    """Whether ``buf`` (no line end yet) may still become a header line once more bytes arrive."""
    head = bytes(buf[:_MAX_HEADER_LINE]).removesuffix(b"\r")
    return re.fullmatch(rb"[A-Za-z0-9-]*([ \t]*:[^\r]*)?", head, re.DOTALL) is not None


def _embedded_header(buf: bytearray, start: int, end: int) -> int | None:
    """Offset of a complete ``Content-Length: N`` header line starting in ``buf[start:end]``, if any."""
    for m in _MARKER.finditer(buf, start, end + _OVERLAP):
        if m.start() >= end:
            break
        nl = buf.find(b"\n", m.end(), m.end() + 40)
        if nl >= 0 and _LENGTH.fullmatch(bytes(buf[m.end() : nl]).rstrip(b"\r")):
            return m.start()
    return None


def _one_json_value(data: bytes) -> bytes | None:
    """``data`` (stripped) when it is exactly one JSON object, e.g. the body of a badly framed message."""
    data = data.strip()
    if not data.startswith(b"{"):
        return None
    try:
        json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return data


def _show(value: bytes) -> str:
    text = value.decode("latin-1").strip()
    return repr(text if len(text) <= 40 else text[:40] + "...")
