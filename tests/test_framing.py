"""Framing (issue 19, class 1): bounded, lenient where harmless, resynchronising, never fatal."""

from __future__ import annotations

import json
import random
import re

from jsonrpc_client import RpcClient

from granite_lsp.framing import Body, FrameParser, FramingError


def frame(body: bytes | dict) -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def _events(data: bytes, chunk: int, max_body: int = 1000) -> list:
    parser = FrameParser(max_body)
    out = []
    for i in range(0, len(data), chunk):
        out += parser.feed(data[i : i + chunk])
    return out + parser.eof()


GOOD = b'{"jsonrpc": "2.0", "id": 7, "method": "granite/stats"}'


def test_bad_headers_are_reported_and_the_next_message_is_found() -> None:
    request = b'{"jsonrpc": "2.0", "id": 1, "method": "m"}'
    cases = {
        b"Content-Length: 1000000000000\r\n\r\n": "over the limit",
        b"Content-Length: 9223372036854775808\r\n\r\n": "over the limit",
        b"Content-Length: 12345678901234567890123456\r\n\r\n": "over the limit",
        b"Content-Length: -5\r\n\r\n": "invalid Content-Length",
        b"Content-Length: twelve\r\n\r\n": "invalid Content-Length",
        b"Content-Type: text/plain\r\n\r\n": "without Content-Length",
    }
    for header, reason in cases.items():
        for chunk in (1, 3, 4096):
            events = _events(header + request + frame(GOOD), chunk)
            assert [type(e) for e in events] == [FramingError, Body], (header, chunk, events)
            assert reason in events[0].reason and events[0].body == request  # so it can be answered
            assert events[1].data == GOOD


def test_lenient_header_forms_are_read() -> None:
    for header in (b"content-length: %d\r\n\r\n", b"Content-Length:%d\r\n\r\n", b"Content-Length: %d\n\n"):
        events = _events(header % len(GOOD) + GOOD + frame(GOOD), 5)
        assert events == [Body(GOOD), Body(GOOD)], header


def test_a_length_too_large_or_too_small_loses_only_its_own_message() -> None:
    too_large = b"Content-Length: 90\r\n\r\n" + b'{"id": 1}'
    too_small = b"Content-Length: 4\r\n\r\n" + b'{"id": 1}'
    for stream in (too_large, too_small):
        for chunk in (1, 7, 4096):
            events = _events(stream + frame(GOOD) + frame(GOOD), chunk)
            assert events[-2:] == [Body(GOOD), Body(GOOD)], (stream, chunk, events)


def test_memory_stays_bounded_while_skipping() -> None:
    parser = FrameParser(max_body=1 << 16)
    parser.feed(b"Content-Length: 10000000000\r\n\r\n")
    for _ in range(100):
        parser.feed(b"x" * 10_000)
        assert len(parser._buf) <= (1 << 16) + 10_000
    events = parser.feed(frame(GOOD))
    assert isinstance(events[0], FramingError) and "over the limit" in events[0].reason
    assert events[1:] == [Body(GOOD)]
    assert parser.skipped_bytes > 900_000


# ---- fuzz: random byte mutations of valid message streams ---------------------------------------------

_TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"Content-Length: ",
    b"content-length:3\n\n",
    b"99999999999999999999999999",
    b"10000000000",
    b"-1",
    b"\x00",
    b"\xff\xfe",
    b"{",
    b"}",
    b'"jsonrpc": "2.0", ',
]


def mutate(r: random.Random, data: bytes) -> bytes:
    """A few random edits of ``data``: bit flips, insertions, deletions, truncation, header-ish tokens."""
    out = bytearray(data)
    for _ in range(r.randint(1, 4)):
        i = r.randrange(len(out) + 1)
        kind = r.randrange(7)
        if kind == 0 and out:
            out[min(i, len(out) - 1)] ^= 1 << r.randrange(8)
        elif kind == 1:
            out[i:i] = bytes(r.randrange(256) for _ in range(r.randint(1, 4)))
        elif kind == 2:
            del out[i : i + r.randint(1, 12)]
        elif kind == 3:
            del out[i:]
        elif kind == 4:
            out[i:i] = r.choice(_TOKENS)
        elif kind == 5 and b"Content-Length: " in out:  # another number in a Content-Length header
            starts = [m.start() for m in re.finditer(b"Content-Length: ", out)]
            at = r.choice(starts) + 16
            end = at
            while end < len(out) and out[end : end + 1].isdigit():
                end += 1
            out[at:end] = r.choice([b"0", b"3", b"%d" % r.randrange(10**6), b"%d" % 2**63, b"1" * 30])
        else:
            j = r.randrange(len(out) + 1)
            out[i:i] = out[j : j + r.randint(1, 30)]
    return bytes(out)


def _messages() -> list[bytes]:
    text = "def f(x):\r\n    return x  # 日本 🎉\n"
    doc = {"uri": "file:///fuzz.py", "languageId": "python", "version": 1, "text": text}
    position = {"line": 1, "character": 4}
    rng = {"start": position, "end": {"line": 1, "character": 10}}
    return [
        frame({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": doc}}),
        frame(
            {
                "jsonrpc": "2.0",
                "method": "textDocument/didChange",
                "params": {
                    "textDocument": {"uri": "file:///fuzz.py", "version": 2},
                    "contentChanges": [{"range": rng, "text": "yield"}],
                },
            }
        ),
        frame(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "textDocument/inlineCompletion",
                "params": {
                    "textDocument": {"uri": "file:///fuzz.py"},
                    "position": position,
                    "context": {"triggerKind": 1},
                },
            }
        ),
        frame({"jsonrpc": "2.0", "id": 2, "method": "granite/stats", "params": None}),
        frame({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 1}}),
        frame({"jsonrpc": "2.0", "id": 3, "method": "granite/noSuchMethod"}),
    ]


def test_parser_fuzz_the_next_message_is_always_found() -> None:
    """In process: after any mutated stream, the next well-framed message comes out exactly."""
    messages = _messages()
    sentinel = frame(GOOD)
    for case in range(20_000):
        r = random.Random(case)
        garbage = mutate(r, b"".join(r.choices(messages, k=r.randint(1, 3))))
        events = _events(garbage + sentinel, r.choice([1, 13, 512, 1 << 16]), max_body=1 << 12)
        assert events and events[-1] == Body(GOOD), (case, garbage, events[-3:])


def test_server_framing_fuzz_never_dies_or_wedges() -> None:
    """The real server over stdio, 10,000 mutated streams in one process: after each, a request on a
    fresh framing boundary gets its normal answer. No ``initialized``: no model loads, so mutated
    completion requests answer at once and the run stays short."""
    rpc = RpcClient()
    try:
        rpc.call("initialize", {"processId": None, "rootUri": None, "capabilities": {}})
        messages = _messages()
        for case in range(10_000):
            r = random.Random(case)
            rpc.send_bytes(mutate(r, b"".join(r.choices(messages, k=r.randint(1, 3)))))
            answer = rpc.sentinel(str(case), timeout=30)
            assert "result" in answer, (case, answer)
        stats = rpc.sentinel("end")["result"]
        print(f"\nframing fuzz: {stats['protocol']}")
        assert stats["protocol"]["framing_errors"] > 1000
        assert rpc.proc.poll() is None
    finally:
        rpc.kill()
