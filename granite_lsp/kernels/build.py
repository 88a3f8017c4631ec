"""Compiling and loading the CPU kernels' library: where it is cached, when it is (re)built, and
what a user sees when it cannot be.

The library is built once per (sources, flags, torch install, Python) into its own directory under
the cache (``build_dir``), by ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja). Later
starts load the built file directly (``torch.ops.load_library``): no lock, no ninja, nothing
written, so a read-only cache works and a lock left by a killed build cannot block them. A build
runs under ``lock.BuildLock`` (a dead owner never blocks; a live one is waited for up to
``GRANITE_LSP_KERNEL_LOCK_TIMEOUT`` seconds). It is announced on stderr and through the caller's
``progress`` callback (the editor shows it as LSP progress). Without a compiler or ninja the reason
is one line; a failed compile is remembered per (sources, compiler), so it is not retried on every
start: the one-line reason points at the full log and says how to retry.

Compile flags live in ``CFLAGS`` (one list; the cache key includes them).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .lock import BuildLock

log = logging.getLogger(__name__)

NAME = "granite_gemv"  # the library's file name and its torch.ops namespace
DIR = Path(__file__).parent
# Every C++ file here is part of the one library (a new per-ISA source file needs no edit here).
SOURCES = sorted(DIR.glob("*.cpp"))
HEADERS = sorted(DIR.glob("*.h"))
# No -march=native: the cached binary must run on any AVX2 machine that shares the cache (faster
# levels are compiled per function and chosen at run time: isa.h, isa.py).
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++20"]
# Written after a successful build: its presence says the library beside it is complete (while the
# library is there: one deleted since, by hand or by a cache cleaner, is built again).
DONE = "built"
# What the kernels are worth, for the messages that say they are missing (README: a decode step
# against torch's matmuls alone on the real shape: 0.45x fp32 ... 0.07x int8).
SPEED_COST = "decode runs ~2-14x slower on torch ops"
# How long a start waits for another live process's build before running on torch ops.
DEFAULT_LOCK_TIMEOUT = 300.0

Progress = Callable[[str], None]


def header_constant(header: str, name: str) -> int:
    """An integer the kernels' sources define (``constexpr int64_t NAME = VALUE;`` in ``header`` here),
    read from the source text: Python knows it without building (or loading) the library, and the C++
    and Python sides cannot disagree."""
    text = (DIR / header).read_text()
    found = re.search(rf"constexpr\s+int64_t\s+{re.escape(name)}\s*=\s*(\d+)\s*;", text)
    if found is None:
        raise RuntimeError(f"{header} defines no constexpr int64_t {name}")
    return int(found.group(1))


def cpu_supported() -> bool:
    """True on x86-64 when the CPU has avx2, fma and f16c (what the binary is compiled for): Linux reads
    /proc/cpuinfo, macOS (Intel Macs) sysctl's machdep.cpu feature lists."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return {"AVX2", "FMA", "F16C"} <= set(out.upper().split())
    if sys.platform != "linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"avx2", "fma", "f16c"} <= flags
    return False


def cache_root() -> Path:
    """``GRANITE_LSP_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/granite-lsp/kernels`` (~/.cache)."""
    root = os.environ.get("GRANITE_LSP_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "granite-lsp" / "kernels"


def build_key(torch_dir: Path | None = None) -> str:
    """What the library depends on: sources, flags, the torch install (its location too: two venvs
    with the same torch version write different include paths into the build file, and sharing a
    directory made each rebuild the other's library) and the Python version."""
    torch_dir = torch_dir or Path(torch.__file__).resolve().parent
    h = hashlib.sha256()
    for f in (*SOURCES, *HEADERS):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(" ".join(CFLAGS).encode() + b"\0" + str(torch_dir).encode())
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{h.hexdigest()[:12]}"
    return tag.replace("+", "_")


def build_dir(torch_dir: Path | None = None) -> Path:
    """The directory of this (sources, flags, torch install, Python): a stale binary is never picked up."""
    return cache_root() / build_key(torch_dir)


def library_path(directory: Path) -> Path:
    return directory / f"{NAME}.so"


def compiler() -> str:
    """The C++ compiler torch's build will run (``CXX``, else ``c++``)."""
    return os.environ.get("CXX", "c++")


def compiler_key() -> str | None:
    """Identifies the compiler a failure is remembered for (path, size, mtime); None when missing."""
    path = shutil.which(compiler())
    if path is None:
        return None
    st = Path(path).resolve().stat()
    return hashlib.sha256(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def lock_timeout() -> float:
    """GRANITE_LSP_KERNEL_LOCK_TIMEOUT, or the default where it is not a finite number (NaN never passes
    a deadline and inf never comes: either would wait forever on a live builder)."""
    try:
        value = float(os.environ.get("GRANITE_LSP_KERNEL_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT
    return value if math.isfinite(value) else DEFAULT_LOCK_TIMEOUT


def load_library(progress: Progress | None = None, *, retry_failed: bool = False) -> tuple[object | None, str | None]:
    """The ``torch.ops`` namespace of the library (building it if needed), or None and the reason in
    one line. ``retry_failed`` builds again although this compiler failed on these sources before."""
    directory = build_dir()
    if (directory / DONE).exists() and library_path(directory).exists():
        try:  # no lock, nothing written: a read-only cache works
            return _load_built(directory), None
        except OSError as e:
            return None, f"{e} (a damaged build? delete {directory} to rebuild); {SPEED_COST}"
    missing = _missing_tools()
    if missing:
        return None, missing
    failed = _failure_file(directory)
    if failed is not None and failed.exists() and not retry_failed:
        return None, failed.read_text().strip()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with BuildLock(directory / "granite.lock", lock_timeout()):
            # Another process may have built it while we waited; a marker without its library (deleted
            # since) is no build at all: it goes first, so that no start trusts it while this one builds.
            if not library_path(directory).exists():
                (directory / DONE).unlink(missing_ok=True)
            if not (directory / DONE).exists():
                return _build(directory, progress)
        return _load_built(directory), None
    except Exception as e:  # a read-only cache without the library, a lock timeout, ...
        return None, f"{type(e).__name__}: {e}"


def _load_built(directory: Path) -> object:
    torch.ops.load_library(str(library_path(directory)))  # type: ignore[no-untyped-call]
    return getattr(torch.ops, NAME)


def _missing_tools() -> str | None:
    """One line naming what is missing to build, the fix, and the cost of going without."""
    if shutil.which(compiler()) is None:
        return (
            f"no C++ compiler ({compiler()!r} not found): install g++ (apt install g++ / dnf install gcc-c++) "
            f"or set CXX, then restart; until then {SPEED_COST}"
        )
    _ensure_ninja_on_path()
    if shutil.which("ninja") is None:
        return f"ninja not found: pip install ninja (in this environment), then restart; until then {SPEED_COST}"
    return None


def _failure_file(directory: Path) -> Path | None:
    key = compiler_key()
    return None if key is None else directory / f"failed-{key}.txt"


def _build(directory: Path, progress: Progress | None) -> tuple[object | None, str | None]:
    """Compile under the lock: clear a torch lock left by a killed build, announce, build, and on
    failure keep the full log and remember the one-line reason for this compiler."""
    from torch.utils.cpp_extension import load

    stale = directory / "lock"  # torch's; we hold the only lock a live builder could take
    if stale.exists():
        log.warning("removing the build lock %s left by an interrupted kernel build", stale)
        stale.unlink(missing_ok=True)
    message = "compiling CPU kernels (one time, about a minute)"
    print(f"granite-lsp: {message} into {directory}", file=sys.stderr, flush=True)
    if progress is not None:
        progress(message)
    try:
        load(
            name=NAME,
            sources=[str(f) for f in SOURCES],
            extra_cflags=CFLAGS,
            build_directory=str(directory),
            is_python_module=False,  # registers torch.ops.granite_gemv; no pybind11 to compile
            verbose=False,  # ninja's output is captured: stdout belongs to the LSP transport
        )
    except Exception as e:
        reason = _remember_failure(directory, f"{type(e).__name__}: {e}")
        return None, reason
    (directory / DONE).write_text(f"{NAME} built from {len(SOURCES)} sources\n")
    return getattr(torch.ops, NAME), None


def _remember_failure(directory: Path, output: str) -> str:
    """Write the build's output to build.log and one line (the first compiler error) to the failure
    file for this compiler; return that line."""
    logfile = directory / "build.log"
    logfile.write_text(output)
    lines = output.splitlines() or ["no output"]
    first = next((ln.strip() for ln in lines if re.search(r"\berror\b", ln)), lines[0])
    reason = (
        f"kernel build failed ({first[:200]}); full log {logfile}; {SPEED_COST}. "
        f"Not retried with this compiler: delete {directory} (or set GRANITE_LSP_REQUIRE_KERNELS=1) to retry"
    )
    failed = _failure_file(directory)
    if failed is not None:
        failed.write_text(reason + "\n")
    return reason


def _ensure_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH, where the PyPI package's binary is only when the venv is activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI package
    except ImportError:
        return
    if ninja.BIN_DIR:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
