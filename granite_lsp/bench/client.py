"""A deliberately plain LSP client (no pygls): raw Content-Length framing over a subprocess's pipes.

Tests use it to check the server from the outside exactly as an editor sees it, including the parts
pygls-based clients would paper over (framing, ids, every request answered exactly once); the bench
drives the server under measurement with it (``trace``, ``microbench --rss``). One client, so that
what the tests check is what the bench times.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "model" / "tiny"
Message = dict[str, Any]  # one JSON-RPC message, as parsed
# How long a model load may take before the client gives up: a guard against a hung server, not a
# timing (a first start compiles the kernels: minutes on a busy 2-core machine).
LOAD_TIMEOUT = 900.0
# How long to wait for any other answer before declaring the server hung. Also a guard, not a timing:
# on a 2-core machine shared with other jobs, a fresh process takes tens of seconds to import torch.
ANSWER_TIMEOUT = 300.0


def server_command(*extra: str, model: str | Path = TINY) -> list[str]:
    return [sys.executable, "-m", "granite_lsp", "--stdio", "--model", str(model), "--device", "cpu", *extra]


class RpcClient:
    def __init__(self, cmd: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            cmd or server_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self._to_server, self._from_server, self._server_log = self.proc.stdin, self.proc.stdout, self.proc.stderr
        self._next_id = 0
        self.responses: dict[Any, Message] = {}
        self.all_responses: list[Message] = []  # in arrival order, including those with "id": null
        self.response_counts: dict[Any, int] = {}
        self.answered_at: dict[Any, float] = {}
        self.notifications: list[Message] = []
        self.notified_at: list[float] = []  # time.monotonic() of each notification's arrival
        self.server_requests: list[Message] = []
        self._cv = threading.Condition()
        self._stderr: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    # ---- framing -----------------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        body = json.dumps(message).encode()
        self._to_server.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self._to_server.flush()

    def send_raw(self, body: bytes) -> None:
        self._to_server.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self._to_server.flush()

    def send_bytes(self, data: bytes) -> None:
        """Exactly ``data`` on the wire: no framing added (framing tests bring their own)."""
        self._to_server.write(data)
        self._to_server.flush()

    def sentinel(self, tag: str, timeout: float = 60.0) -> Message:
        """A granite/stats request with a string id no other message uses, once answered.

        The server answers in order, so any answer it owed before it read this one is out by then:
        tests wait for it instead of sleeping while they look for duplicate or phantom answers.
        """
        msg_id = f"sentinel-{tag}"
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": "granite/stats", "params": None})
        return self.wait(msg_id, timeout)

    def _read(self) -> None:
        out = self._from_server
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    with self._cv:
                        self._cv.notify_all()
                    return
                line = line.strip()
                if not line:
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length is None:
                raise RuntimeError("a message without Content-Length from the server")
            msg: Message = json.loads(out.read(length))
            with self._cv:
                if "method" in msg and "id" in msg:
                    self.server_requests.append(msg)
                    self._answer_server_request(msg)
                elif "method" in msg:
                    self.notifications.append(msg)
                    self.notified_at.append(time.monotonic())
                else:
                    self.responses[msg.get("id")] = msg
                    self.all_responses.append(msg)
                    self.answered_at.setdefault(msg.get("id"), time.monotonic())
                    self.response_counts[msg.get("id")] = self.response_counts.get(msg.get("id"), 0) + 1
                self._cv.notify_all()

    def _answer_server_request(self, msg: Message) -> None:
        # window/workDoneProgress/create, client/registerCapability, ...: accept them all (unless the
        # test has closed the server's stdin on purpose).
        try:
            self.send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
        except (ValueError, BrokenPipeError):
            pass

    def _drain_stderr(self) -> None:
        for line in self._server_log:
            self._stderr.put(line)

    def stderr_text(self) -> str:
        lines = []
        while not self._stderr.empty():
            lines.append(self._stderr.get().decode(errors="replace"))
        return "".join(lines)

    # ---- requests ----------------------------------------------------------------------------------

    def request(self, method: str, params: Any = None) -> int:
        self._next_id += 1
        self.send({"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params})
        return self._next_id

    def notify(self, method: str, params: Any = None) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def wait(self, msg_id: Any, timeout: float = ANSWER_TIMEOUT) -> Message:
        deadline = time.monotonic() + timeout
        with self._cv:
            while msg_id not in self.responses:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and msg_id not in self.responses:
                    raise TimeoutError(f"no response to {msg_id}; stderr:\n{self.stderr_text()}")
                self._cv.wait(min(left, 0.5))
            return self.responses[msg_id]

    def call(self, method: str, params: Any = None, timeout: float = ANSWER_TIMEOUT) -> Any:
        resp = self.wait(self.request(method, params), timeout)
        if "error" in resp:
            raise RuntimeError(f"{method} failed: {resp['error']}")
        return resp.get("result")

    def wait_notification(
        self, method: str, pred: Callable[[Any], bool] = lambda p: True, timeout: float = ANSWER_TIMEOUT, after: int = 0
    ) -> Message:
        """The first ``method`` notification matching ``pred`` (among those from index ``after`` on)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for n in self.notifications[after:]:
                    if n["method"] == method and pred(n.get("params")):
                        return n
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {method} notification; stderr:\n{self.stderr_text()}")
                self._cv.wait(min(left, 0.5))

    # ---- LSP conveniences ----------------------------------------------------------------------------

    def initialize(
        self, options: Message | None = None, capabilities: Message | None = None, wait_ready: bool = True
    ) -> Any:
        caps = {
            "general": {"positionEncodings": ["utf-16"]},
            "window": {"workDoneProgress": True},
            "textDocument": {"inlineCompletion": {"dynamicRegistration": False}},
        }
        caps.update(capabilities or {})
        result = self.call(
            "initialize",
            {"processId": os.getpid(), "rootUri": None, "capabilities": caps, "initializationOptions": options or {}},
        )
        self.notify("initialized", {})
        if wait_ready:
            self.wait_ready(LOAD_TIMEOUT)
        return result

    def open(self, uri: str, text: str, language: str = "python", version: int = 1) -> None:
        self.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": language, "version": version, "text": text}},
        )

    def change(self, uri: str, version: int, start: tuple[int, int], end: tuple[int, int], text: str) -> None:
        rng = {
            "start": {"line": start[0], "character": start[1]},
            "end": {"line": end[0], "character": end[1]},
        }
        self.notify(
            "textDocument/didChange",
            {"textDocument": {"uri": uri, "version": version}, "contentChanges": [{"range": rng, "text": text}]},
        )

    def inline_params(self, uri: str, line: int, character: int, automatic: bool = False) -> Message:
        return {
            "textDocument": {"uri": uri},
            "position": {"line": line, "character": character},
            "context": {"triggerKind": 2 if automatic else 1},
        }

    def inline(
        self, uri: str, line: int, character: int, automatic: bool = False, timeout: float = ANSWER_TIMEOUT
    ) -> Any:
        return self.call("textDocument/inlineCompletion", self.inline_params(uri, line, character, automatic), timeout)

    def wait_ready(self, timeout: float = LOAD_TIMEOUT) -> Message:
        """The params of the first ``granite/status`` that says the model is ready or failed."""
        note = self.wait_notification("granite/status", lambda p: p["state"] in ("ready", "error"), timeout)
        params: Message = note["params"]
        return params

    def peak_rss_mb(self) -> float:
        """The server process's peak resident memory (VmHWM), NaN where /proc cannot tell."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return float("nan")

    def close(self) -> None:
        """Shut the server down politely, killing it if it does not go."""
        try:
            self.shutdown_and_exit(timeout=30.0)
        except Exception:
            self.kill()

    def shutdown_and_exit(self, timeout: float = 60.0) -> int:
        self.call("shutdown", None)
        self.notify("exit", None)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
