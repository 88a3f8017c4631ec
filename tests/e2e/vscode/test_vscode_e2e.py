"""End-to-end: the VS Code extension (editors/vscode) in real VS Code (code-server), driven by
Playwright through headless Chromium, against granite-lsp with the tiny fixture model.

The test itself is editors/vscode/e2e/e2e.test.mjs (Node); this wrapper runs it under pytest so
that ``pytest -m e2e`` covers both editors. It needs editors/vscode/e2e/setup.sh to have run
(apt packages, npm installs, the .vsix, code-server); it is skipped otherwise.

Run:  bash editors/vscode/e2e/setup.sh && .venv/bin/pytest tests/e2e/vscode -m e2e -v
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[3]
EXT = REPO / "editors" / "vscode"
E2E = EXT / "e2e"
CODE_SERVER = E2E / "node_modules" / "code-server" / "out" / "node" / "entry.js"
VSIX = EXT / "granite-vscode.vsix"
MODEL = REPO / "model" / "tiny"


def test_vscode_ghost_text_accept():
    missing = [str(p) for p in (CODE_SERVER, VSIX) if not p.exists()]
    if missing or not shutil.which("node"):
        pytest.skip(f"run editors/vscode/e2e/setup.sh first (missing: {', '.join(missing) or 'node'})")
    env = dict(os.environ)
    if not env.get("GRANITE_E2E_SERVER_CMD") and not env.get("GRANITE_E2E_FAKE"):
        if not (MODEL / "fixtures.json").exists():
            pytest.skip(f"{MODEL} has no fixtures.json (build the tiny model first)")
        server = Path(sys.executable).parent / "granite-lsp"
        env["GRANITE_E2E_SERVER_CMD"] = json.dumps([str(server), "--stdio", "--model", str(MODEL)])
    proc = subprocess.run(
        ["bash", str(E2E / "run.sh")],
        cwd=E2E,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1800,
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"VS Code e2e failed (exit {proc.returncode}):\n{proc.stdout[-20000:]}"


def test_vscode_download_model_from_the_error(tmp_path):
    """No model anywhere (an empty Hugging Face cache): the server's error offers "Download model",
    which runs ``granite-lsp download`` against a stand-in hub on 127.0.0.1; the server then loads the
    model and completes (editors/vscode/e2e/e2e.test.mjs, its GRANITE_E2E_HUB test)."""
    missing = [str(p) for p in (CODE_SERVER, VSIX) if not p.exists()]
    if missing or not shutil.which("node"):
        pytest.skip(f"run editors/vscode/e2e/setup.sh first (missing: {', '.join(missing) or 'node'})")
    sys.path.insert(0, str(REPO / "tests"))
    from hub_standin import HubStandIn

    hub_id = "ibm-granite/granite-4.0-h-350m-base"
    server = Path(sys.executable).parent / "granite-lsp"
    with HubStandIn(hub_id, MODEL) as hub:
        env = {
            **os.environ,
            "GRANITE_E2E_HUB": hub.url,
            "GRANITE_E2E_HUB_MODEL": hub_id,
            "GRANITE_E2E_SERVER": str(server),
        }
        env.pop("GRANITE_E2E_SERVER_CMD", None)
        proc = subprocess.run(
            ["bash", str(E2E / "run.sh")],
            cwd=E2E,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=1200,
        )
        gets = list(hub.gets)
    print(proc.stdout)
    assert proc.returncode == 0, f"VS Code download e2e failed (exit {proc.returncode}):\n{proc.stdout[-20000:]}"
    assert "model.safetensors" in " ".join(gets), gets  # it came from the stand-in


def test_vscode_streaming_unit():
    """The extension's streaming logic (src/streaming.ts) under node's test runner: retriggers,
    cancellation and partial/final ordering, which the end-to-end run only hits by timing."""
    if not (EXT / "node_modules" / "typescript").exists() or not shutil.which("npm"):
        pytest.skip("run editors/vscode/e2e/setup.sh first (extension npm dependencies)")
    proc = subprocess.run(
        ["npm", "test", "--silent"],
        cwd=EXT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"npm test failed (exit {proc.returncode}):\n{proc.stdout[-8000:]}"
    assert "# fail 0" in proc.stdout, proc.stdout[-4000:]
