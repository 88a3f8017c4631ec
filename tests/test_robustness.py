"""Reliability: every request answered exactly once, bad input survived, faults recovered, exits prompt."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from conftest import TINY, single_line_fixture
from jsonrpc_client import RpcClient, server_command


def _error_code(resp: dict) -> int | None:
    return resp.get("error", {}).get("code")


def test_every_request_gets_exactly_one_response(rpc: RpcClient) -> None:
    before = rpc.request("textDocument/inlineCompletion", rpc.inline_params("file:///a.py", 0, 0))
    assert _error_code(rpc.wait(before)) == -32002  # ServerNotInitialized
    rpc.initialize()
    bad = rpc.request("textDocument/inlineCompletion", {"textDocument": 42, "position": "nowhere"})
    assert _error_code(rpc.wait(bad)) == -32602  # InvalidParams (pygls alone would never answer)
    unknown = rpc.request("granite/noSuchMethod", {})
    assert _error_code(rpc.wait(unknown)) == -32601
    rpc.call("shutdown")
    after = rpc.request("textDocument/inlineCompletion", rpc.inline_params("file:///a.py", 0, 0))
    assert _error_code(rpc.wait(after)) == -32600
    rpc.sentinel("no-duplicates")  # answered in order: a duplicate owed before it would be out by now
    assert all(count == 1 for count in rpc.response_counts.values())
    rpc.notify("exit")
    rpc.notify("exit")  # a second exit is harmless
    assert rpc.proc.wait(5) == 0


def test_bad_input_is_survived(rpc: RpcClient) -> None:
    rpc.initialize({"contextTokens": 0})  # the final exact check must not see the other documents
    fixture = single_line_fixture()
    # Unknown URI, positions out of range: null, not a crash.
    assert rpc.inline("file:///never/opened.py", 0, 0) is None
    rpc.open("file:///small.py", "x = 1\n")
    assert rpc.inline("file:///small.py", 99, 0) is None
    assert rpc.inline("file:///small.py", 0, 999) is None
    # NUL bytes, lone surrogates escaped in JSON, a 1 MB single line, a 20 MB file: bounded time.
    rpc.open("file:///nul.py", "a\x00b = 1\n\x00")
    assert "result" in rpc.wait(rpc.request("textDocument/inlineCompletion", rpc.inline_params("file:///nul.py", 1, 0)))
    rpc.send_raw(
        json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "textDocument/didOpen",
                "params": {
                    "textDocument": {"uri": "file:///sur.py", "languageId": "python", "version": 1, "text": "x"}
                },
            }
        )
        .replace('"x"', '"\\ud800x"')
        .encode()
    )
    assert "result" in rpc.wait(rpc.request("textDocument/inlineCompletion", rpc.inline_params("file:///sur.py", 0, 1)))
    long_line = "v = [" + "1, " * 350_000 + "]\n"
    # Bounded work, counted rather than timed: each prompt holds at most the configured budgets.
    budget = 1536 + 256 + 64  # prefixTokens + suffixTokens + control tokens and the file name
    rpc.open("file:///long.py", long_line)
    rpc.inline("file:///long.py", 0, len(long_line) // 2, timeout=120)
    assert 0 < rpc.call("granite/stats")["last"]["prompt_tokens"] <= budget
    big = fixture["text"] * (20_000_000 // len(fixture["text"]) + 1)
    rpc.open("file:///big.py", big)
    line = big.count("\n") // 2
    rpc.inline("file:///big.py", line, 0, timeout=120)
    assert 0 < rpc.call("granite/stats")["last"]["prompt_tokens"] <= budget
    rpc.change("file:///big.py", 2, (line, 0), (line, 0), "z")
    rpc.inline("file:///big.py", line, 1, timeout=120)
    assert 0 < rpc.call("granite/stats")["last"]["prompt_tokens"] <= budget
    # Still serving exact completions afterwards.
    rpc.open("file:///ok.py", fixture["text"])
    assert (
        rpc.inline("file:///ok.py", fixture["line"], fixture["character"])["items"][0]["insertText"]
        == fixture["middle"]
    )
    assert rpc.proc.poll() is None


def test_ten_thousand_open_documents(rpc: RpcClient) -> None:
    rpc.initialize()
    for i in range(10_000):
        rpc.open(f"file:///many/{i}.py", f"value_{i} = {i}\n")
    stats = rpc.call("granite/stats", timeout=120)
    assert stats["documents"] == 10_000
    for i in range(0, 10_000, 2):
        rpc.notify("textDocument/didClose", {"textDocument": {"uri": f"file:///many/{i}.py"}})
    assert rpc.call("granite/stats", timeout=60)["documents"] == 5_000


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def test_load_two_thousand_requests_with_edits(rpc: RpcClient) -> None:
    rpc.initialize({"maxTokens": 4})
    fixture = single_line_fixture()
    uri = "file:///load.py"
    rpc.open(uri, fixture["text"])
    line, col = fixture["line"], fixture["character"]
    version = 1
    ids: list[int] = []
    rss_after_warmup = 0.0
    t0 = time.monotonic()
    for i in range(2000):
        if i % 4 == 3:  # type a character, then delete it again
            version += 1
            rpc.change(uri, version, (line, col), (line, col), "x")
            version += 1
            rpc.change(uri, version, (line, col), (line, col + 1), "")
        ids.append(rpc.request("textDocument/inlineCompletion", rpc.inline_params(uri, line, col, automatic=True)))
        if i % 50 == 49:
            rpc.wait(ids[-1], timeout=120)  # let the model finish now and then, as a pause in typing would
        if i == 200:
            rss_after_warmup = _rss_mb(rpc.proc.pid)
    for msg_id in ids:
        rpc.wait(msg_id, timeout=120)
    elapsed = time.monotonic() - t0
    growth = _rss_mb(rpc.proc.pid) - rss_after_warmup
    stats = rpc.call("granite/stats")
    print(f"\nload: 2000 requests answered in {elapsed:.1f} s, RSS growth after warm-up {growth:.1f} MB, {stats}")
    assert all(rpc.response_counts[i] == 1 for i in ids)
    assert growth < 50
    # Stale jobs never ran the model: model runs = jobs that were current when they started. Jobs are the
    # requests and the work ahead submitted after answers (ahead.answered), most of it made stale by the
    # next keystroke.
    jobs = 2000 + stats["background"]["jobs"]
    assert stats["worker"]["ran"] <= jobs - stats["worker"]["stale"] + 1


def test_model_load_faults_then_retry_by_configuration(tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file")
    rpc = RpcClient(server_command(model=broken))
    try:
        rpc.initialize()
        status = rpc.wait_notification("granite/status", lambda p: p["state"] == "error")
        assert status["params"]["message"]
        assert any(n["method"] == "window/showMessage" for n in rpc.notifications)
        rpc.open("file:///a.py", "x = ")
        assert rpc.inline("file:///a.py", 0, 4) is None
        # The user fixes the setting: the server retries and serves.
        rpc.notify("workspace/didChangeConfiguration", {"settings": {"granite": {"model": str(TINY)}}})
        rpc.wait_notification("granite/status", lambda p: p["state"] == "ready")
        fixture = single_line_fixture()
        rpc.open("file:///b.py", fixture["text"])
        assert rpc.inline("file:///b.py", fixture["line"], fixture["character"])["items"]
    finally:
        rpc.kill()


def test_exits_when_the_client_process_is_gone() -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    rpc = RpcClient()
    try:
        rpc.call(
            "initialize",
            {"processId": parent.pid, "rootUri": None, "capabilities": {}, "initializationOptions": {}},
        )
        rpc.notify("initialized", {})
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert rpc.proc.wait(timeout=30) == 0
        assert f"client process {parent.pid} is gone" in rpc.stderr_text()  # the watcher saw it, nothing else
    finally:
        rpc.kill()


def test_logs_hold_no_document_text(tmp_path) -> None:
    log_file = tmp_path / "server.log"
    rpc = RpcClient(server_command("--log-file", str(log_file)))
    try:
        rpc.initialize()
        secret = "TOP_SECRET_TOKEN_42"
        rpc.open("file:///s.py", f"password = '{secret}'\n")
        rpc.inline("file:///s.py", 1, 0)
        rpc.shutdown_and_exit()
    finally:
        rpc.kill()
    assert secret not in log_file.read_text()


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets ``pid`` listens on, from /proc (no extra tools needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    found.append(cols[1].split(":")[0])
    return found


def _wait_listening(pid: int, timeout: float = 120.0) -> list[str]:
    """The addresses ``pid`` listens on, once it listens on any. The timeout only keeps a server that
    never listens from hanging the suite: reaching it fails the test."""
    deadline = time.monotonic() + timeout
    while not (addresses := _listening_addresses(pid)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} listened on nothing within {timeout:.0f} s")
        time.sleep(0.2)
    return addresses


def test_tcp_binds_loopback_by_default() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "granite_lsp", "--tcp", "--port", "0", "--model", str(TINY)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        addresses = _wait_listening(proc.pid)
        assert addresses and all(a == "0100007F" for a in addresses), addresses  # 127.0.0.1 only
    finally:
        proc.kill()
        proc.wait()


def test_a_failing_request_and_a_crashed_worker_are_survived() -> None:
    """Failpoints (GRANITE_LSP_FAILPOINTS) make the first completion job kill the model worker
    thread and the second raise inside the completion: each request still gets one answer (null),
    the crash is logged, a new worker takes over, and the third request is served exactly."""
    rpc = RpcClient(env={"GRANITE_LSP_FAILPOINTS": "worker-crash:1,complete:1"})
    try:
        rpc.initialize()
        fixture = single_line_fixture()
        rpc.open("file:///f.py", fixture["text"])
        first = rpc.inline("file:///f.py", fixture["line"], fixture["character"])
        second = rpc.inline("file:///f.py", fixture["line"], fixture["character"])
        assert first is None and second is None
        third = rpc.inline("file:///f.py", fixture["line"], fixture["character"])
        assert third["items"][0]["insertText"] == fixture["middle"]
        worker = rpc.call("granite/stats")["worker"]
        assert (worker["crashes"], worker["restarts"], worker["errors"]) == (1, 1, 1)
        assert all(count == 1 for count in rpc.response_counts.values())
        assert rpc.proc.poll() is None
        log = rpc.stderr_text()
        assert "model worker thread crashed" in log and "model job failed" in log
    finally:
        rpc.kill()


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def test_out_of_memory_while_loading_then_retry() -> None:
    """A real allocation failure: the server's address space is capped (prlimit) a little above what
    it uses, then it is asked for a real-shape model (1.3 GB of weights). It must say so clearly,
    answer null, and load again once the configuration changes back."""
    import resource

    rpc = RpcClient()
    try:
        rpc.initialize()
        fixture = single_line_fixture()
        rpc.open("file:///m.py", fixture["text"])
        assert rpc.inline("file:///m.py", fixture["line"], fixture["character"])["items"]
        cap = _vm_size(rpc.proc.pid) + (300 << 20)
        resource.prlimit(rpc.proc.pid, resource.RLIMIT_AS, (cap, cap))
        real = TINY.parent / "granite-4.0-h-350m" / "config.json"
        rpc.notify("workspace/didChangeConfiguration", {"settings": {"granite": {"randomWeights": str(real)}}})
        status = rpc.wait_notification("granite/status", lambda p: p["state"] == "error", timeout=120)
        assert "not enough memory" in status["params"]["message"]
        assert rpc.inline("file:///m.py", fixture["line"], fixture["character"]) is None
        seen = len(rpc.notifications)
        rpc.notify("workspace/didChangeConfiguration", {"settings": {"granite": {"randomWeights": ""}}})
        rpc.wait_notification("granite/status", lambda p: p["state"] == "ready", timeout=120, after=seen)
        item = rpc.inline("file:///m.py", fixture["line"], fixture["character"])["items"][0]
        assert item["insertText"] == fixture["middle"]
        assert rpc.proc.poll() is None
    finally:
        rpc.kill()


def test_tcp_on_an_explicit_host_warns() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "granite_lsp", "--tcp", "--host", "0.0.0.0", "--port", "0", "--model", str(TINY)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        addresses = _wait_listening(proc.pid)
        assert addresses == ["00000000"], addresses  # what the user asked for, and only that
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "listening on 0.0.0.0" in err and "anyone who can reach" in err


def _listener() -> tuple[object, int, list[int]]:
    """A local TCP server counting connections: the stand-in for the Hugging Face Hub."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    hits: list[int] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            hits.append(1)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return sock, sock.getsockname()[1], hits


def test_no_network_unless_a_download_is_asked_for(tmp_path) -> None:
    """A model id that is not cached: without --download nothing connects to the hub (here a local
    listener standing in for it via HF_ENDPOINT); with --download the same command does connect."""
    sock, port, hits = _listener()
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
        "HF_HUB_OFFLINE": "0",
        "NO_PROXY": "127.0.0.1",
    }
    src = tmp_path / "a.py"
    src.write_text("x = 1\n")
    cmd = [sys.executable, "-m", "granite_lsp", "complete", str(src), "--line", "0", "--character", "0"]
    try:
        out = subprocess.run(
            [*cmd, "--model", "some-org/some-model"], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 2 and "--download" in out.stderr
        assert hits == [], "the server contacted the hub without being asked to"
        out = subprocess.run(
            [*cmd, "--model", "some-org/some-model", "--download"], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 2 and "download failed" in out.stderr
        assert hits, "--download should have contacted the (stand-in) hub"
    finally:
        sock.close()


def test_context_comes_only_from_open_documents(tmp_path) -> None:
    """Files next to an open document, or named by URI in it, are never read: the prompt is the same
    size whether or not a large file sits there (the server reads no files, only what the editor sends)."""
    sizes = []
    folder = tmp_path / "project"
    folder.mkdir()
    for with_secret in (False, True):
        if with_secret:
            (folder / "secret.py").write_text("API_KEY = 'do-not-read'\n" * 2000)
        uri = (folder / "a.py").as_uri()
        text = f"# see {(folder / 'secret.py').as_uri()} and secret.py\nimport secret\nvalue = secret."
        rpc = RpcClient()
        try:
            rpc.call(
                "initialize",
                {
                    "processId": os.getpid(),
                    "rootUri": folder.as_uri(),
                    "workspaceFolders": [{"uri": folder.as_uri(), "name": "w"}],
                    "capabilities": {},
                    "initializationOptions": {"raw": True},  # the whole generation, no early answer
                },
            )
            rpc.notify("initialized", {})
            rpc.wait_notification("granite/status", lambda p: p["state"] in ("ready", "error"))
            rpc.open(uri, text)
            rpc.inline(uri, 2, len("value = secret."))
            stats = rpc.call("granite/stats")
            assert stats["last"], stats
            sizes.append(stats["last"]["prompt_tokens"])
        finally:
            rpc.kill()
    assert sizes[0] > 0 and sizes[0] == sizes[1], sizes
