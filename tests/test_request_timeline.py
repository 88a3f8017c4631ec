"""Where a request's time and the server's memory go, through the real server on model/tiny: the wait for
the model thread split by what held it, the phases up to the first partial with new text (timeline.py),
and the resident memory while work ahead runs (bench/rss_watch.py).

Assertions are on the server's counters, recorded moments and memory, never on elapsed time.
"""

from __future__ import annotations

import time

from conftest import REPO, wait_stats
from jsonrpc_client import RpcClient

from granite_lsp.ahead import AFTER_ANSWER_S, DEBOUNCE_S
from granite_lsp.bench.rss_watch import RssSampler, rss_bound
from granite_lsp.timeline import BEHIND, PHASES

TASKS = REPO / "model" / "corpus" / "tasks.py"
OPTIONS = {"raw": True, "maxTokens": 8, "ignoreEos": True, "typeThrough": False, "debounceMs": 0}
STREAMING = {"experimental": {"granitePartialCompletion": True}}
URI = "file:///big.py"


def _big_document() -> tuple[str, list[int]]:
    """tasks.py several times over (a prompt at its full budget: background work of many pieces), and
    the lines of its ``def render`` bodies far enough down for a full prefix."""
    text = TASKS.read_text() * 8
    lines = text.splitlines()
    places = [i + 1 for i, line in enumerate(lines) if "def render" in line]
    return text, places[len(places) // 2 :]


def _focus(rpc: RpcClient, line: int) -> None:
    rpc.notify("granite/focus", {"textDocument": {"uri": URI}, "position": {"line": line, "character": 4}})


def _request(rpc: RpcClient, line: int) -> dict:
    rpc.call("textDocument/inlineCompletion", rpc.inline_params(URI, line, 4))
    return rpc.call("granite/stats")


def _settled(rpc: RpcClient) -> dict:
    """Once the work ahead that the last request or focus left behind (held a while first) has run."""
    time.sleep(2 * AFTER_ANSWER_S + DEBOUNCE_S)  # let it be queued, then wait it out
    return wait_stats(rpc, lambda s: not s["worker"]["busy"], "idle", timeout=120.0)


def test_a_request_that_arrives_during_background_work_is_counted_as_waiting_behind_it(rpc: RpcClient) -> None:
    text, places = _big_document()
    rpc.initialize(OPTIONS)
    rpc.open(URI, text)
    behind_background = 0
    # Work ahead runs in pieces: a request sent once it runs nearly always finds it still running; if it
    # finished first, move elsewhere (new work ahead) and try again.
    for line in places[:6]:
        runs = rpc.call("granite/stats")["background"].get("runs", 0)
        _focus(rpc, line)
        wait_stats(rpc, lambda s, r=runs: s["background"].get("runs", 0) > r and s["worker"]["busy"], "working", 120.0)
        stats = _request(rpc, line)
        if stats["last"]["behind"] == "background":
            behind_background += 1
            assert "queue" in stats["last"]["phases"]  # its wait for the model thread was recorded
            assert stats["worker"]["preempted"] >= 1
            break
    assert behind_background == 1, "no request ever arrived while work ahead ran"
    assert stats["waits"]["background"]["count"] == 1
    waited = stats["waits"]["background"]  # that one wait, the request's own queue phase
    assert waited["max_ms"] == waited["p95_ms"] == waited["median_ms"] == stats["last"]["phases"]["queue"] > 0

    # The same request again with the model thread idle: counted apart.
    stats = _settled(rpc)
    idle_before = stats["waits"]["idle"]["count"]
    stats = _request(rpc, line)
    assert stats["last"]["behind"] == "idle"
    assert stats["waits"]["idle"]["count"] == idle_before + 1
    assert stats["waits"]["background"]["count"] == 1
    assert set(stats["waits"]) == set(BEHIND)


def test_the_phases_of_a_streamed_request_add_up_and_its_first_text_goes_out_before_decoding_on(rpc: RpcClient) -> None:
    text, places = _big_document()
    rpc.initialize(OPTIONS, capabilities=STREAMING)
    rpc.open(URI, text)
    stats = _request(rpc, places[0])
    last = stats["last"]
    phases = last["phases"]
    assert set(PHASES.values()) <= set(phases), phases  # every moment up to the partial written out
    assert abs(sum(phases[p] for p in PHASES.values()) - phases["first_visible"]) < 1e-3
    assert last["steps_to_visible"] >= 1 and last["processed_tokens"] > 0
    # The document's first request has no trail to take tokens from (engine.py): a forward per token before.
    assert last["forwards_to_visible"] == last["steps_to_visible"] - 1
    # The first partial with text was written out before the model chose the token after it.
    assert last["generated_tokens"] > last["steps_to_visible"]
    assert phases["sent_before_next_token"] >= 0
    rpc.wait_notification("granite/partialCompletion", lambda p: bool(p["text"]))  # the one "sent" marks


def test_background_work_keeps_the_servers_rss_within_cache_cap_weights_and_100_mb(rpc: RpcClient) -> None:
    """Issue 15's memory bound, with the server's own cap and weight bytes, RSS sampled from /proc while
    work ahead runs at one place after another in several documents (checkpoints pile up)."""
    text, places = _big_document()
    rpc.initialize(OPTIONS)
    sampler = RssSampler(rpc.proc.pid, period=0.02).start()
    done = 0
    for uri in ("file:///a.py", "file:///b.py", "file:///c.py"):
        rpc.open(uri, text)
        for line in places[:3]:
            rpc.notify("granite/focus", {"textDocument": {"uri": uri}, "position": {"line": line, "character": 4}})
            done += 1
            wait_stats(rpc, lambda s, n=done: s["background"].get("completed", 0) >= n, "worked ahead", 120.0)
    stats = _settled(rpc)
    rss = {**sampler.stop(), **rss_bound(stats)}
    assert stats["background"]["completed"] == 9 and stats["background"]["tokens"] > 1000
    assert 0 < stats["cache"]["bytes"] <= stats["cache"]["max_bytes"]
    assert rss["samples"] > 0 and rss["model_mb"] > 0
    assert rss["peak_mb"] <= rss["bound_mb"], rss


def test_work_ahead_after_a_request_waits_for_a_pause_after_its_answer(rpc: RpcClient) -> None:
    """A keystroke sent as soon as the previous suggestion arrived finds no work ahead to wait behind: the
    work ahead a request leaves behind is held AFTER_ANSWER_S from its answer (not from its arrival, which
    a request longer than that had always used up), so the keystroke makes it stale before it runs."""
    text, places = _big_document()
    line = places[0]
    rpc.initialize({**OPTIONS, "maxTokens": 512})  # a request longer than AFTER_ANSWER_S on any machine
    rpc.open(URI, text)
    stats = _request(rpc, line)
    assert stats["last"]["generated_tokens"] == 512
    rpc.change(URI, 2, (line, 4), (line, 4), "x")  # the next keystroke, at once
    stats = _request(rpc, line)  # (its position is the previous one: the request is what matters)
    assert stats["background"]["runs"] == 0 and stats["background"]["jobs"] >= 1
    assert stats["last"]["behind"] == "idle" and stats["waits"]["background"]["count"] == 0
