"""The kernel build as a user meets it (kernels/build.py, kernels/lock.py): a lock left by a killed
build, another process building, a read-only cache, two torch installs, no compiler, a compile that
fails. Each start runs in a fresh interpreter (the kernels are decided once per process) on a cache
of its own; none of them compiles the library (a broken stand-in compiler fails at once)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from granite_lsp import kernels
from granite_lsp.kernels import build
from granite_lsp.kernels.lock import BuildLock, LockTimeout

pytestmark = pytest.mark.skipif(not build.cpu_supported(), reason="the kernels are not built on this CPU")

# Prints what a start decided: available, the reason, and any progress message.
START = textwrap.dedent(
    """
    import json
    from granite_lsp import kernels
    heard = []
    ok = kernels.load(heard.append) is not None
    print(json.dumps({"available": ok, "error": kernels.build_error(), "progress": heard}))
    """
)


def _start(cache: Path, timeout: float = 240, **env: str) -> tuple[dict, str]:
    """One start's decision (the JSON line START prints) and its stderr."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("GRANITE_LSP_")}
    full.update(GRANITE_LSP_KERNEL_CACHE=str(cache), **env)
    proc = subprocess.run(
        [sys.executable, "-c", START], env=full, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _broken_compiler(tmp_path: Path) -> tuple[Path, Path]:
    """A C++ compiler that exists, answers version queries as g++ does, and fails every compile,
    counting its runs."""
    counter = tmp_path / "compiler-runs"
    cxx = tmp_path / "bin" / "c++"
    cxx.parent.mkdir()
    script = f"""#!/bin/sh
        echo run >> "{counter}"
        case " $* " in *" -c "*) ;; *) echo 12.2.0; exit 0;; esac  # --version, -dumpversion: a g++
        echo "x.cpp:1:1: error: this compiler is broken" >&2
        exit 1
        """
    cxx.write_text(textwrap.dedent(script))
    cxx.chmod(0o755)
    return cxx, counter


def _runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_cache_key_depends_on_the_torch_install() -> None:
    """Two venvs with the same torch version build into different directories (sharing one, each
    rebuilt the other's library); the same install always finds the same directory."""
    a, b = build.build_key(Path("/venv-a/torch")), build.build_key(Path("/venv-b/torch"))
    assert a != b
    assert a == build.build_key(Path("/venv-a/torch"))
    import torch

    assert build.build_dir() == build.cache_root() / build.build_key(Path(torch.__file__).resolve().parent)


def test_no_compiler_is_one_line_with_the_fix_and_nothing_is_built(tmp_path: Path) -> None:
    decision, stderr = _start(tmp_path / "cache", CXX=str(tmp_path / "missing" / "c++"))
    assert not decision["available"]
    error = decision["error"]
    assert "\n" not in error and "no C++ compiler" in error and "install" in error and "slower" in error
    assert "ninja" not in stderr.lower() and "FAILED" not in stderr
    assert decision["progress"] == []  # nothing was compiled
    assert not (tmp_path / "cache").exists()


def test_a_failed_compile_is_reported_in_one_line_and_not_retried(tmp_path: Path) -> None:
    cxx, counter = _broken_compiler(tmp_path)
    first, stderr = _start(tmp_path / "cache", CXX=str(cxx))
    assert not first["available"] and _runs(counter) > 0
    assert "\n" not in first["error"] and "this compiler is broken" in first["error"]
    assert "compiling CPU kernels (one time" in stderr and first["progress"][0].startswith("compiling CPU kernels")
    log = tmp_path / "cache" / build.build_key() / "build.log"
    assert str(log) in first["error"] and "this compiler is broken" in log.read_text()
    runs = _runs(counter)
    second, _ = _start(tmp_path / "cache", CXX=str(cxx))
    assert second["error"] == first["error"] and _runs(counter) == runs  # remembered, the compiler not run
    assert second["progress"] == []


def test_a_lock_left_by_a_dead_build_is_recovered(tmp_path: Path) -> None:
    """A build killed mid-compile leaves torch's lock file (and ours, with its dead pid): the next
    start must get past them (on main it waited forever) and here reach the compiler."""
    cxx, counter = _broken_compiler(tmp_path)
    directory = tmp_path / "cache" / build.build_key()
    directory.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (directory / "lock").touch()  # torch's
    (directory / "granite.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "here", "since": 0}))
    decision, _ = _start(tmp_path / "cache", timeout=120, CXX=str(cxx))
    assert not decision["available"] and "this compiler is broken" in decision["error"]
    assert _runs(counter) > 0


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    code = (
        "import pathlib, time\nfrom granite_lsp.kernels.lock import BuildLock\n"
        f"BuildLock(pathlib.Path({str(path)!r}), 5).acquire()\nprint('held', flush=True)\ntime.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_live_builder_is_waited_for_with_a_bound(tmp_path: Path) -> None:
    """Another live process holding the build lock: waited for up to the timeout, then named in the
    error (the start runs on torch ops); once it dies the lock is free at once."""
    path = tmp_path / "granite.lock"
    holder = _hold_lock(path)
    try:
        with pytest.raises(LockTimeout, match=f"pid {holder.pid}"):
            BuildLock(path, timeout=0.5).acquire()
        directory = tmp_path / "cache" / build.build_key()
        directory.mkdir(parents=True)
        holder2 = _hold_lock(directory / "granite.lock")
        try:
            decision, _ = _start(tmp_path / "cache", timeout=120, GRANITE_LSP_KERNEL_LOCK_TIMEOUT="1")
            assert not decision["available"] and f"pid {holder2.pid}" in decision["error"]
        finally:
            holder2.kill()
            holder2.wait()
    finally:
        holder.kill()
        holder.wait()
    with BuildLock(path, timeout=5):  # its owner is dead: free without waiting out the timeout
        pass


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


@pytest.mark.skipif(not kernels.available(), reason=f"extension unavailable: {kernels.build_error()}")
def test_a_read_only_cache_with_the_library_loads_it_and_writes_nothing(tmp_path: Path) -> None:
    """The built library is loaded as it is: no lock taken (a torch lock left beside it is no
    obstacle), nothing written, so a read-only cache works; no compiler needed either."""
    src = build.build_dir()
    directory = tmp_path / "cache" / src.name
    directory.mkdir(parents=True)
    for name in (build.library_path(src).name, build.DONE):
        shutil.copy2(src / name, directory / name)
    (directory / "lock").touch()  # left by a server killed while loading (issue 19 item 6)
    for p in (*directory.iterdir(), directory, directory.parent):
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _tree(tmp_path / "cache")
    try:
        decision, stderr = _start(tmp_path / "cache", timeout=120, CXX=str(tmp_path / "no-compiler"))
    finally:
        for p in (directory.parent, directory, *directory.iterdir()):
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert decision == {"available": True, "error": None, "progress": []}
    assert _tree(tmp_path / "cache") == before
    assert "compiling" not in stderr


@pytest.mark.skipif(not kernels.available(), reason=f"extension unavailable: {kernels.build_error()}")
def test_a_deleted_library_whose_done_marker_remains_is_built_again(tmp_path: Path) -> None:
    """The library deleted (by hand, a cache cleaner) but the done-marker left: a start used to trust
    the marker, fail to load the missing file and run on torch ops for good. It builds again; on a copy
    of this machine's build directory (its object files kept) that is a link, not a compile."""
    src = build.build_dir()
    directory = tmp_path / "cache" / src.name
    shutil.copytree(src, directory)
    build.library_path(directory).unlink()
    (directory / "granite.lock").unlink(missing_ok=True)
    assert (directory / build.DONE).exists()
    decision, stderr = _start(tmp_path / "cache")
    assert decision["available"] and decision["error"] is None, decision
    assert any(m.startswith("compiling CPU kernels") for m in decision["progress"]), decision
    assert build.library_path(directory).exists() and (directory / build.DONE).exists()


def test_require_kernels_makes_their_absence_an_error(tmp_path: Path) -> None:
    """GRANITE_LSP_REQUIRE_KERNELS=1 (CI): a start without kernels fails instead of running slower,
    unless they were disabled on purpose (GRANITE_LSP_KERNELS=0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRANITE_LSP_")}
    env.update(
        GRANITE_LSP_KERNEL_CACHE=str(tmp_path), GRANITE_LSP_REQUIRE_KERNELS="1", CXX=str(tmp_path / "no" / "c++")
    )
    proc = subprocess.run([sys.executable, "-c", START], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "KernelsRequired" in proc.stderr and "no C++ compiler" in proc.stderr
    decision, _ = _start(tmp_path, GRANITE_LSP_REQUIRE_KERNELS="1", GRANITE_LSP_KERNELS="0")
    assert decision["error"] == "disabled by GRANITE_LSP_KERNELS=0"


def test_the_editor_hears_about_the_compile(tmp_path: Path) -> None:
    """A server whose kernels are not built yet says so in LSP progress (and on stderr) while it
    loads; the compile fails here (a broken stand-in compiler), and the server comes up on torch ops."""
    from jsonrpc_client import RpcClient

    cxx, _ = _broken_compiler(tmp_path)
    env = {"GRANITE_LSP_KERNEL_CACHE": str(tmp_path / "cache"), "CXX": str(cxx), "GRANITE_LSP_REQUIRE_KERNELS": "0"}
    client = RpcClient(env=env)
    try:
        client.initialize()
        assert client.wait_ready()["state"] == "ready"
        reports = [
            n["params"]["value"].get("message", "")
            for n in client.notifications
            if n["method"] == "$/progress" and n["params"]["value"].get("kind") == "report"
        ]
        assert any(m.startswith("compiling CPU kernels (one time") for m in reports), reports
        client.shutdown_and_exit()
        assert "compiling CPU kernels (one time" in client.stderr_text()
    finally:
        client.kill()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "soon"])
def test_a_lock_timeout_that_is_not_a_finite_number_gives_the_default(value: str, monkeypatch) -> None:
    """NaN never compares past a deadline and inf is one that never comes: either made a start wait forever
    on a live builder, which the timeout exists to prevent."""
    monkeypatch.setenv("GRANITE_LSP_KERNEL_LOCK_TIMEOUT", value)
    assert build.lock_timeout() == build.DEFAULT_LOCK_TIMEOUT
    monkeypatch.setenv("GRANITE_LSP_KERNEL_LOCK_TIMEOUT", "2.5")
    assert build.lock_timeout() == 2.5
