"""The remote engine against an engine that answers 200 but not in the API's shape (a proxy's error page,
a half-upgraded server, a different API): each such answer is an engine failure (null for the editor, the
engine marked down with the reason), never an exception out of the request.

The engine is a stand-in on 127.0.0.1 (a real socket server sending fixed bytes), in front of the real
tokenizer and prompt builder of model/tiny: no real engine sends these bytes on purpose.
"""

from __future__ import annotations

import socket
import threading

import pytest
from conftest import TINY

from granite_lsp.engine import Generation
from granite_lsp.fim import PromptBuilder
from granite_lsp.remote_engine import RemoteEngine
from granite_lsp.settings import Settings
from granite_lsp.tokens import TextTokenizer

_SSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"


def _events(*data: bytes) -> bytes:
    return _SSE + b"\r\n" + b"".join(b"data: " + d + b"\n\n" for d in data)


ANSWERS = {
    "an event that is JSON but not an object": _events(b"[1, 2]"),
    "a choice that is not an object": _events(b'{"choices": [5]}'),
    "usage that is not an object": _events(b'{"choices": [{"text": "x"}], "usage": 3}'),
    "choices that are not a list": _events(b'{"choices": 7}'),
    "a text that is not a string": _events(b'{"choices": [{"text": 5}]}'),
    "a chunk size that is not hexadecimal": _SSE + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "a Content-Length that is not a number": _SSE + b"Content-Length: lots\r\n\r\n",
}


class _Engine:
    """Accepts connections on 127.0.0.1 and answers each with ``answer`` after reading the request."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")),
                    0,
                )
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_dir(TINY)


def _generate(answer: bytes, tokenizer: TextTokenizer) -> tuple[RemoteEngine, Generation]:
    engine = _Engine(answer)
    try:
        settings = Settings(engine="remote", endpoint=engine.url, remote_model="m", remote_timeout_ms=5_000)
        remote = RemoteEngine(tokenizer, settings)
        prompt = PromptBuilder(tokenizer).build("def f(x):\n    return ", 21)
        return remote, remote.generate("file:///a.py", prompt, 8)
    finally:
        engine.close()


@pytest.mark.parametrize("what", list(ANSWERS))
def test_an_answer_not_in_the_apis_shape_is_an_engine_failure(what: str, tokenizer: TextTokenizer) -> None:
    remote, gen = _generate(ANSWERS[what], tokenizer)
    assert gen.stop_reason == "unavailable"
    assert remote.health.down and remote.stats.failed == 1
    assert remote.stats.last_error


def test_token_counts_that_are_not_numbers_are_left_out_and_the_text_is_served(tokenizer: TextTokenizer) -> None:
    usage = b'"usage": {"prompt_tokens": "many", "prompt_tokens_details": {"cached_tokens": "some"}}'
    remote, gen = _generate(_events(b'{"choices": [{"text": "x"}], ' + usage + b"}"), tokenizer)
    assert gen.text == "x" and gen.stop_reason != "unavailable" and not remote.health.down
    assert gen.stats.cached_tokens is None and gen.stats.prompt_tokens > 0
