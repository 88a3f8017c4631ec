"""``granite-lsp doctor``: what granite-lsp finds on this machine, as one report a user can paste in an issue.

Every line is read from the same code the server runs (the device choice, the kernels module, the model
lookup, the settings), never re-derived here, so the report cannot disagree with what the server does.
The editors show the same report (VS Code's "Granite: Show Doctor Report", Neovim's ``:checkhealth``).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from . import __version__
from .model_files import find_model, hf_cache_dir
from .settings import Settings

Line = tuple[str, bool]  # (text, fine): a False line is a problem that stops completions


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"({type(e).__name__})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def isa_level(kernels: object) -> str:
    """The instruction-set level the loaded kernels run at, the levels this CPU has, and why a requested
    GRANITE_LSP_ISA was not applied; "avx2" (the one build's floor) for kernels that do not say."""
    level = getattr(kernels, "isa_level", None)
    if not callable(level):
        return "avx2"
    text = str(level())
    levels = getattr(kernels, "isa_levels", None)
    if callable(levels):
        text += f" (this CPU: {', '.join(levels())})"
    note = getattr(kernels, "isa_note", None)
    if callable(note) and note():
        text += f"; {note()}"
    return text


def _torch_lines(settings: Settings) -> Iterator[Line]:
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    yield (
        f"torch {torch.__version__} ({build}; CUDA device: {'yes' if cuda else 'no'}; MPS: {'yes' if mps else 'no'})",
        True,
    )
    from .service import pick_device

    try:
        yield f"device: {settings.device} -> {pick_device(settings.device)}", True
    except RuntimeError as e:
        yield f"device: {settings.device} -> unusable: {e}", False


def _kernel_lines() -> Iterator[Line]:
    from . import kernels
    from .kernels import build

    def progress(message: str) -> None:
        print(f"granite-lsp doctor: {message}", file=sys.stderr, flush=True)

    where = build.build_dir()
    loaded = kernels.load(progress)
    if loaded is not None:
        yield f"CPU kernels: built and loaded ({where})", True
        yield f"ISA level: {isa_level(loaded)}", True
    else:
        yield f"CPU kernels: unavailable, torch ops instead (slower): {kernels.build_error()}", True
        yield "ISA level: none (kernels unavailable)", True
    cxx = build.compiler()
    found = shutil.which(cxx)
    yield (
        (
            f"C++ compiler: {cxx} -> {found} ({_first_line([found, '--version'])})"
            if found
            else f"C++ compiler: {cxx} not found (install g++ or clang++ for the CPU kernels)"
        ),
        True,
    )
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_pkg

            ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
        except ImportError:
            pass
    yield f"ninja: {ninja or 'not found'}", True


def report(settings: Settings) -> Iterator[Line]:
    """The report's lines, in order; each says what was found and where."""
    here = Path(__file__).resolve().parent
    yield f"granite-lsp {__version__} ({here})", True
    yield f"Python {platform.python_version()} ({sys.executable}) on {platform.system()} {platform.machine()}", True
    yield from _torch_lines(settings)
    yield from _kernel_lines()
    lookup = find_model(settings.model)
    yield f"model: {settings.model}", True
    for place in lookup.searched:
        yield f"  searched {place}", True
    if lookup.found:
        yield f"  -> using {lookup.path}", True
    elif lookup.path is not None:
        yield f"  -> unusable: {lookup.problem}", False
    else:
        yield f"  -> NOT FOUND: run `granite-lsp download {settings.model}` (or pass --model DIR)", False
    hf_vars = ", ".join(f"{k}={os.environ[k]}" for k in ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT") if k in os.environ)
    yield f"Hugging Face cache: {hf_cache_dir()}{f' ({hf_vars})' if hf_vars else ''}", True
    from .kernels import build

    yield f"kernel cache: {build.cache_root()} (this install's build: {build.build_dir().name})", True
    shown = ", ".join(f"{f.name}={getattr(settings, f.name)!r}" for f in fields(settings))
    yield f"settings: {shown}", True
