"""Progressive context (progressive.py, issue 15) through the real server on model/tiny.

A request is served from the short window until the full one is built, and each answer is the one a
server whose only window is the one used gives. Assertions are on suggestions and the server's counters
(``last.window``, ``processed_tokens``), never on elapsed time.
"""

from __future__ import annotations

import json

from conftest import REPO, wait_stats
from jsonrpc_client import RpcClient

from granite_lsp.progressive import READY_TOKENS, SHORT

# A ~2k-token file (shlex.py, as the bench's traces open it) and a place in its middle.
SHLEX = json.loads((REPO / "bench" / "traces" / "jump_and_back.jsonl").read_text().splitlines()[0])["text"]
URI = "file:///shlex.py"
LINE, CHARACTER = 279, 8
OPTIONS = {"raw": True, "maxTokens": 8, "ignoreEos": True, "typeThrough": False}
SHORT_OPTIONS = {**OPTIONS, "prefixTokens": SHORT.prefix_tokens, "suffixTokens": SHORT.suffix_tokens}


def _request(rpc: RpcClient, line: int = LINE, character: int = CHARACTER) -> tuple[str, dict]:
    result = rpc.call("textDocument/inlineCompletion", rpc.inline_params(URI, line, character))
    items = (result or {}).get("items", [])
    return (items[0]["insertText"] if items else ""), rpc.call("granite/stats")["last"]


def _served(options: dict, text: str = SHLEX, line: int = LINE, character: int = CHARACTER) -> tuple[str, dict]:
    """The first answer of a fresh server with ``options`` for ``text``."""
    rpc = RpcClient()
    try:
        rpc.initialize(options)
        rpc.open(URI, text)
        return _request(rpc, line, character)
    finally:
        rpc.kill()


def test_a_request_before_the_full_window_is_built_is_served_exactly_from_the_short_one(rpc: RpcClient) -> None:
    rpc.initialize(OPTIONS)
    rpc.open(URI, SHLEX)
    text, last = _request(rpc)
    assert last["window"] == "short"
    # Nothing was built ahead: the short window's whole prompt, far less than the full one's.
    full_text, full = _served({**OPTIONS, "progressive": False})
    assert full["window"] == "full" and last["processed_tokens"] < full["processed_tokens"] / 2
    short_text, short = _served(SHORT_OPTIONS)
    assert short["window"] == "full"  # that server's only window is the short one
    assert text == short_text and last["processed_tokens"] == short["processed_tokens"]


def test_once_the_full_window_is_built_requests_use_it(rpc: RpcClient) -> None:
    rpc.initialize(OPTIONS)
    rpc.open(URI, SHLEX)
    _, last = _request(rpc)
    assert last["window"] == "short"
    # The user pauses: work ahead at the request's place builds the full window.
    stats = wait_stats(rpc, lambda s: s["background"].get("completed", 0) >= 1, "built the full window", 120.0)
    assert stats["background"]["tokens"] > last["prompt_tokens"]
    text, last = _request(rpc)
    assert last["window"] == "full" and last["processed_tokens"] <= READY_TOKENS
    full_text, _ = _served({**OPTIONS, "progressive": False})
    assert text == full_text


def test_an_edit_above_the_short_window_leaves_it_intact(rpc: RpcClient) -> None:
    """An import added at the top: the full window changed at its start, the short one only moved. The
    answer is the short window's, for the edited text, as a fresh short-window server gives it."""
    rpc.initialize(OPTIONS)
    rpc.open(URI, SHLEX)
    _, last = _request(rpc)
    assert last["window"] == "short"
    rpc.change(URI, 2, (0, 0), (0, 0), "import functools\n")
    text, last = _request(rpc, LINE + 1)
    assert last["window"] == "short" and last["processed_tokens"] <= 1
    edited = "import functools\n" + SHLEX
    short_text, _ = _served(SHORT_OPTIONS, edited, LINE + 1)
    assert text == short_text


def test_progressive_off_serves_every_request_from_the_full_window(rpc: RpcClient) -> None:
    rpc.initialize({**OPTIONS, "progressive": False})
    rpc.open(URI, SHLEX)
    _, last = _request(rpc)
    assert last["window"] == "full" and last["processed_tokens"] > 1000


def test_every_answer_of_a_trace_is_exact_for_the_window_it_used(make_service) -> None:
    """Typing over a trace with work ahead between some keystrokes (so that both windows serve): each
    answer equals that of a from-scratch service whose only window is the one used. The from-scratch
    services see every request, as the two windows' prompt builders do."""
    from test_state_reuse import BUDGET, TRACES, replay

    from granite_lsp.progressive import short_budget
    from granite_lsp.settings import Settings

    trace = [json.loads(line) for line in (TRACES / "type_short.jsonl").read_text().splitlines()]
    options = {**BUDGET, "progressive": True}
    served = make_service(**options)
    short = short_budget(Settings().updated(options).budget())
    assert short is not None
    short_options = {**options, "prefixTokens": short.prefix_tokens, "suffixTokens": short.suffix_tokens}
    scratch = {"full": make_service(**options, reuse=False), "short": make_service(**short_options, reuse=False)}
    windows: list[str] = []
    mismatches: list[int] = []

    def check(uri: str, text: str, cursor: int) -> None:
        if len(windows) % 8 == 4:  # the user paused: work ahead builds both windows
            done = served.prepare(uri, text, cursor, lambda: False)
            assert done is not None and done.complete
        got = served.complete(uri, text, cursor)
        answers = {window: svc.complete(uri, text, cursor) for window, svc in scratch.items()}
        windows.append(got.window)
        if got.generation.token_ids != answers[got.window].generation.token_ids:
            mismatches.append(len(windows))

    replay(trace, check)
    assert mismatches == [], f"answers differ from their window's at steps {mismatches}"
    assert windows.count("short") >= 4 and windows.count("full") >= 10, windows
