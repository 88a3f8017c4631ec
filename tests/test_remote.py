"""The remote engine against real engines (no mocks): granite-lsp's server process, ``--engine remote``,
in front of vLLM (CPU build) or llama.cpp's server serving model/tiny on 127.0.0.1 (tests/engines.py).

vLLM: the fixtures' memorized middles arrive whole and streamed (partial notifications), the prompt goes
out as token ids the engine counts exactly, a stale request is cancelled by closing its stream, a wrong
API key and a dead engine are answered with null and shown in granite/status, and the server recovers
when the engine is back. llama.cpp's server: the same middles, and its prefix cache serves the second
keystroke's prompt (cached tokens > 0).
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import load_fixtures
from engines import (
    API_KEY,
    API_KEY_ENV,
    MODEL_NAME,
    TINY,
    EngineProcess,
    free_port,
    llama_process,
    llama_server,
    require_vllm,
    vllm_process,
)
from jsonrpc_client import RpcClient, server_command

STREAMING = {"experimental": {"granitePartialCompletion": True}}


@pytest.fixture(scope="module")
def vllm(tmp_path_factory) -> EngineProcess:
    python = require_vllm()
    engine = vllm_process(python, tmp_path_factory.mktemp("vllm") / "vllm.log")
    engine.start()
    yield engine
    engine.kill()


def _server(engine: EngineProcess, env: dict[str, str] | None = None, **options) -> RpcClient:
    cmd = server_command("--engine", "remote", "--endpoint", engine.url, "--remote-model", MODEL_NAME)
    client = RpcClient(cmd, env={API_KEY_ENV: API_KEY, **(env or {})})
    client.initialize({"apiKeyEnv": API_KEY_ENV, "debounceMs": 0, **options}, capabilities=STREAMING)
    return client


def _cursor(fixture: dict) -> tuple[int, int]:
    return fixture["line"], fixture["character"]


def _close(client: RpcClient, uri: str) -> None:
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})


def _partials(client: RpcClient, request_id: str) -> list[dict]:
    return [
        n["params"]
        for n in client.notifications
        if n["method"] == "granite/partialCompletion" and n["params"]["requestId"] == request_id
    ]


def _statuses(client: RpcClient, after: int = 0) -> list[dict]:
    return [n["params"] for n in client.notifications[after:] if n["method"] == "granite/status"]


def test_fixtures_through_vllm_streamed(vllm: EngineProcess) -> None:
    """Every memorized middle, whole, with the growing text streamed before the answer."""
    client = _server(vllm)
    try:
        ready = _statuses(client)[-1]
        assert ready["state"] == "ready" and ready["engine"] == "remote" and ready["endpoint"] == vllm.url, ready
        streamed = 0
        for i, fx in enumerate(load_fixtures()):
            uri = f"file:///remote/{i}/{fx['file'].split('/')[-1]}"
            client.open(uri, fx["text"])
            msg_id = client.request("textDocument/inlineCompletion", client.inline_params(uri, *_cursor(fx)))
            result = client.wait(msg_id, timeout=120)["result"]
            assert result and result["items"][0]["insertText"] == fx["middle"], (fx["file"], result)
            partials = _partials(client, str(msg_id))
            assert partials[-1]["done"] and partials[-1]["text"] == fx["middle"]
            streamed += len(partials) > 2
            last = client.call("granite/stats")["last"]
            assert last["prompt_tokens"] > 0 and last["stop_reason"] in ("eos", "callback"), last
            _close(client, uri)  # open documents lend context to the next prompts
        assert streamed >= 3, "no middle arrived in pieces"
        remote = client.call("granite/stats")["remote"]
        assert remote["answered"] == len(load_fixtures()) and remote["failed"] == 0
        client.shutdown_and_exit()
        assert API_KEY not in client.stderr_text() + json.dumps(client.notifications)  # the key is never logged
    finally:
        client.kill()


def test_prompt_ids_are_counted_exactly_by_vllm(vllm: EngineProcess) -> None:
    """The request carries our token ids; the engine's usage.prompt_tokens equals their number (a
    control token split into text pieces, or a BOS added in front, would change it)."""
    from granite_lsp.documents import Document
    from granite_lsp.fim import PromptBuilder
    from granite_lsp.remote_engine import RemoteEngine
    from granite_lsp.remote_http import Endpoint, post_events
    from granite_lsp.settings import Settings
    from granite_lsp.tokens import TextTokenizer

    tokenizer = TextTokenizer.from_dir(TINY)
    settings = Settings().updated({"engine": "remote", "endpoint": vllm.url, "remoteModel": MODEL_NAME})
    engine = RemoteEngine(tokenizer, settings)
    fx = next(f for f in load_fixtures() if f["character"] > 0)
    cursor = Document("x", fx["text"]).offset_at(*_cursor(fx))
    ids = engine.prompt_ids(PromptBuilder(tokenizer).build(fx["text"], cursor))
    assert tokenizer.control.fim_middle in ids
    usage = {}
    for data in post_events(
        Endpoint.parse(vllm.url),
        "/completions",
        engine.request_body(ids, 8, ignore_eos=False),
        headers={"Authorization": f"Bearer {API_KEY}"},
    ):
        if data != "[DONE]":
            usage = json.loads(data).get("usage") or usage
    assert usage["prompt_tokens"] == len(ids)


def test_stale_request_is_cancelled_by_closing_the_stream(vllm: EngineProcess) -> None:
    """A long generation is under way (partials arriving); the user types: the request is answered
    null, its stream closed, and the next request completes normally."""
    client = _server(vllm, maxTokens=2000, ignoreEos=True, raw=True)
    try:
        fx = load_fixtures()[0]
        uri = "file:///remote/cancel.py"
        client.open(uri, fx["text"])
        msg_id = client.request("textDocument/inlineCompletion", client.inline_params(uri, *_cursor(fx)))
        client.wait_notification("granite/partialCompletion", lambda p: p["requestId"] == str(msg_id), timeout=120)
        line, character = _cursor(fx)
        client.change(uri, 2, (line, character), (line, character), " ")
        assert client.wait(msg_id, timeout=60)["result"] is None
        stats = client.call("granite/stats")
        assert stats["worker"]["cancelled_running"] == 1
        for _ in range(600):  # the worker closes the stream within a poll tick of the change
            remote = client.call("granite/stats")["remote"]
            if remote["cancelled"]:
                break
            time.sleep(0.05)
        assert remote["cancelled"] == 1 and remote["failed"] == 0, remote
        client.change(uri, 3, (line, character), (line, character + 1), "")
        client.notify(
            "workspace/didChangeConfiguration", {"settings": {"granite": {"maxTokens": 64, "ignoreEos": False}}}
        )
        result = client.inline(uri, *_cursor(fx), timeout=120)
        assert result and result["items"][0]["insertText"] == fx["middle"]
    finally:
        client.kill()


def test_wrong_api_key_is_an_error_status_not_a_crash(vllm: EngineProcess) -> None:
    """HTTP 401: null answers, a status saying why, and the key itself appears nowhere."""
    wrong = "not-the-key-71c2"
    client = _server(vllm, env={API_KEY_ENV: wrong})
    try:
        error = next(s for s in _statuses(client) if s["state"] == "error")
        assert "401" in error["message"], error
        fx = load_fixtures()[0]
        client.open("file:///remote/key.py", fx["text"])
        assert client.inline("file:///remote/key.py", *_cursor(fx), timeout=60) is None
        assert client.call("granite/stats")["counters"]["errors"] == 0
        client.shutdown_and_exit()
        logged = client.stderr_text() + json.dumps(client.notifications)
        assert wrong not in logged and API_KEY not in logged
    finally:
        client.kill()


def test_stalled_engine_times_out(vllm: EngineProcess) -> None:
    """The engine stops answering (SIGSTOP) with a request in flight: the request ends after
    remoteTimeoutMs with null and an error status; once the engine runs again, completions resume."""
    client = _server(vllm, remoteTimeoutMs=2000)
    try:
        fx = load_fixtures()[0]
        uri = "file:///remote/stall.py"
        client.open(uri, fx["text"])
        seen = len(client.notifications)
        vllm.pause()
        try:
            assert client.inline(uri, *_cursor(fx), timeout=120) is None
            error = client.wait_notification("granite/status", lambda p: p["state"] == "error", after=seen)
            assert "no data from the engine for 2 s" in error["params"]["message"], error
        finally:
            vllm.resume()
        result = None
        for _ in range(100):  # the first try after the backoff window reaches the engine again
            result = client.inline(uri, *_cursor(fx), timeout=120)
            if result is not None:
                break
            time.sleep(0.5)
        assert result and result["items"][0]["insertText"] == fx["middle"]
    finally:
        client.kill()


def test_engine_dies_mid_stream_then_recovers(vllm: EngineProcess) -> None:
    """The engine is killed during a generation: that request and the following ones answer null (no
    hang), granite/status says the engine is unavailable; once it is back, completions resume and the
    status says so. Runs last in this module: it restarts the engine."""
    client = _server(vllm, maxTokens=2000, ignoreEos=True, raw=True)
    try:
        fx = load_fixtures()[0]
        uri = "file:///remote/dies.py"
        client.open(uri, fx["text"])
        msg_id = client.request("textDocument/inlineCompletion", client.inline_params(uri, *_cursor(fx)))
        client.wait_notification("granite/partialCompletion", lambda p: p["requestId"] == str(msg_id), timeout=120)
        seen = len(client.notifications)
        vllm.kill()
        assert client.wait(msg_id, timeout=60)["result"] is None
        error = client.wait_notification("granite/status", lambda p: p["state"] == "error", after=seen)["params"]
        assert vllm.url.removesuffix("/v1") in error["message"] and "unavailable" in error["message"], error
        assert client.inline(uri, *_cursor(fx), timeout=60) is None  # down: null at once, not a hang
        remote = client.call("granite/stats")["remote"]
        assert remote["failed"] >= 1 and remote["down"], remote

        seen = len(client.notifications)
        vllm.start()
        client.notify(
            "workspace/didChangeConfiguration", {"settings": {"granite": {"maxTokens": 64, "ignoreEos": False}}}
        )
        result = None
        for _ in range(100):  # each try after the backoff window reaches the engine again
            result = client.inline(uri, *_cursor(fx), timeout=60)
            if result is not None:
                break
            time.sleep(0.5)
        assert result and result["items"][0]["insertText"].startswith(fx["middle"][:10])
        back = client.wait_notification("granite/status", lambda p: p["state"] == "ready", after=seen)["params"]
        assert "answering again" in back["message"]
    finally:
        client.kill()


def test_unreachable_engine_answers_null_and_says_why() -> None:
    """Nothing listens at the endpoint: the server loads (only the tokenizer), says the engine is
    unavailable, answers null at once and keeps running. Needs no engine."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    client = RpcClient(server_command("--engine", "remote", "--endpoint", url, "--remote-model", MODEL_NAME))
    try:
        client.initialize({"debounceMs": 0})
        error = next(s for s in _statuses(client) if s["state"] == "error")
        assert f"127.0.0.1:{port}" in error["message"] and "cannot connect" in error["message"], error
        fx = load_fixtures()[0]
        client.open("file:///remote/none.py", fx["text"])
        for _ in range(3):
            assert client.inline("file:///remote/none.py", *_cursor(fx), timeout=60) is None
        stats = client.call("granite/stats")
        assert stats["model_loaded"] and stats["remote"]["down"] and stats["counters"]["errors"] == 0, stats
        assert client.shutdown_and_exit() == 0
    finally:
        client.kill()


def test_remote_settings_are_validated() -> None:
    from granite_lsp.settings import Settings, SettingsError

    s = Settings().updated({"engine": "remote", "endpoint": "http://h:1/v1", "remoteModel": "m", "apiKeyEnv": "K"})
    assert (s.engine, s.endpoint, s.remote_model, s.api_key_env) == ("remote", "http://h:1/v1", "m", "K")
    assert s.model_key() != Settings().model_key()  # switching engines reloads
    with pytest.raises(SettingsError):
        Settings().updated({"engine": "cloud"})


# ---- llama.cpp's server ----------------------------------------------------------------------------


@pytest.mark.slow
def test_llama_server_fixtures_and_prefix_cache(tmp_path) -> None:
    """llama.cpp's server: the memorized middles, and its cache serving the second keystroke's prompt."""
    found = llama_server()
    if found is None:
        pytest.skip("llama.cpp's server is not built (set GRANITE_LLAMA_SERVER and GRANITE_TINY_GGUF: see README)")
    engine = llama_process(*found, tmp_path / "llama.log")
    engine.start(timeout=120)
    client = _server(engine, raw=True, typeThrough=False)  # every keystroke reaches the engine
    try:
        for i, fx in enumerate(load_fixtures()[:6]):
            uri = f"file:///llama/{i}.txt"
            client.open(uri, fx["text"])
            result = client.inline(uri, *_cursor(fx), timeout=120)
            assert result and result["items"][0]["insertText"] == fx["middle"], (fx["file"], result)
            _close(client, uri)
        # Two keystrokes on one line: the anchored prompt of the second extends the first.
        fx = next(f for f in load_fixtures() if f["character"] == 0 and "\n" in f["middle"])
        uri = "file:///llama/typing.txt"
        client.open(uri, fx["text"])
        line = fx["line"]
        assert client.inline(uri, line, 0, timeout=120)
        first = client.call("granite/stats")["last"]
        client.change(uri, 2, (line, 0), (line, 0), fx["middle"][0])
        assert client.inline(uri, line, 1, timeout=120)
        second = client.call("granite/stats")["last"]
        assert first["cached_tokens"] is not None and second["cached_tokens"] > 0, (first, second)
        print(
            f"llama.cpp cached tokens: first keystroke {first['cached_tokens']} of {first['prompt_tokens']}, "
            f"second {second['cached_tokens']} of {second['prompt_tokens']}"
        )
    finally:
        client.kill()
        engine.kill()
