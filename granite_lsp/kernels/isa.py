"""The kernels' instruction-set level: which one runs, which ones this CPU has, and forcing a lower one.

The extension is one build for every x86-64 CPU with AVX2/FMA/F16C; faster paths (AVX-512F,
AVX512_VNNI, AVX512_BF16, AMX) are compiled per function and chosen at run time (``isa.h`` lists
what each level changes). ``GRANITE_LSP_ISA=avx2|avx512|avx512_vnni|avx512_bf16|amx`` caps the level for the
process (a name the CPU lacks is ignored: ``note()`` says why); ``set_level`` changes it at run time,
which the exactness tests use to run on every level this CPU has.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ops import CpuKernels

# Lowest first; each level includes the ones before it (isa.h).
LEVELS = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")
# The /proc/cpuinfo flags each level needs on top of the previous one.
_NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_vnni": {"avx512_vnni"},
    "avx512_bf16": {"avx512_bf16"},
    "amx": {"amx_tile", "amx_int8", "amx_bf16"},
}
# Linux's arch_prctl request for AMX's tile data (isa.cpp's amx_refusal makes the same one).
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18
# The flags worth printing in a report (what the kernels or llama.cpp could use).
REPORTED_FLAGS = (
    *sorted(_NEEDS["avx2"]),
    *sorted(_NEEDS["avx512"]),
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ('', empty) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model, flags = "", set[str]()
    for line in text.splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return model, flags


def cpu_levels() -> list[str]:
    """The levels this CPU's flags allow, lowest first (the same rule as isa.cpp's, without building
    the extension: for parametrizing tests at collection time)."""
    flags = cpu_info()[1]
    out: list[str] = []
    for name in LEVELS:
        if not _NEEDS[name] <= flags or (name == "amx" and not amx_permitted()):
            break
        out.append(name)
    return out


def amx_permitted() -> bool:
    """Whether the OS lets this process use AMX's tile data: the request isa.cpp makes before it
    offers the amx level (granted once, for the whole process; asking again is harmless). A CPU
    with the amx flags under a kernel that refuses (before Linux 5.16, or a hypervisor hiding the
    state) has no amx level on either side."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)) == 0
    except (OSError, AttributeError):
        return False


def cpu_report() -> dict[str, object]:
    """The CPU model and its ISA flags that matter here, for a bench's header and JSON."""
    model, flags = cpu_info()
    return {"cpu": model, "isa_flags": [f for f in REPORTED_FLAGS if f in flags]}


def _ops() -> CpuKernels:
    from .ops import build_error, load

    ops = load()
    if ops is None:
        raise RuntimeError(f"kernels unavailable: {build_error()}")
    return ops


def level() -> str | None:
    """The level the kernels run at, or None without the extension."""
    from .ops import load

    ops = load()
    return None if ops is None else ops.isa_level()


def levels() -> list[str]:
    """The levels the extension can run at on this CPU, lowest first."""
    return _ops().isa_levels()


def set_level(name: str) -> str:
    """Runs the kernels at ``name`` from now on (process-wide); returns the previous level.
    ValueError when the CPU lacks it or it is not a level."""
    if name not in LEVELS:
        raise ValueError(f"unknown ISA level {name!r}: one of {', '.join(LEVELS)}")
    ops = _ops()
    if name not in ops.isa_levels():
        raise ValueError(f"this CPU lacks ISA level {name!r} (it has {', '.join(ops.isa_levels())})")
    return ops.set_isa_level(name)


@contextlib.contextmanager
def at_level(name: str) -> Iterator[None]:
    """Runs the block at ISA level ``name``, then restores the previous level."""
    previous = set_level(name)
    try:
        yield
    finally:
        set_level(previous)


def note() -> str:
    """Why GRANITE_LSP_ISA was not applied ('' when it was, or is unset, or without the extension)."""
    from .ops import load

    ops = load()
    return "" if ops is None else ops.isa_note()


def rounds_activations_to_bf16(weight_dtype: object, scaled: bool = False) -> bool:
    """Whether a product with these weights rounds x to bf16 at the level in use: bf16 weights
    without a scale at avx512_bf16 and above (amx's tile matmuls round them the same way), in the
    prefill GEMM and the streaming kernels alike (linear.cpp's ``product`` decides; this mirrors it
    for the tests' references)."""
    import torch

    current = level()
    return (
        weight_dtype == torch.bfloat16
        and not scaled
        and current is not None
        and LEVELS.index(current) >= LEVELS.index("avx512_bf16")
    )


def quantizes_activations_to_int8(weight_dtype: object) -> bool:
    """Whether a product with these weights quantizes x to int8 per row at the level in use: int8
    weights at avx512_vnni and above (amx's tile matmuls quantize them the same way), in the prefill
    GEMM and the streaming kernels alike (linear.cpp's ``product`` decides, linear_vnni.cpp says how;
    this mirrors it for the tests' references and tolerances)."""
    import torch

    current = level()
    return weight_dtype == torch.int8 and current is not None and LEVELS.index(current) >= LEVELS.index("avx512_vnni")
