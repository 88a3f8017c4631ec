"""Optional CUDA kernels for the Mamba2 mixer: ``causal_conv1d`` and ``mamba_ssm``'s Triton scans.

On a CUDA device ``layers.MambaMixer`` hands its depthwise conv and its selective scan to these
packages when they are installed, and runs its own torch ops otherwise (or when a kernel does not
take the shape). Both sides compute the same thing on the same layouts: the wrappers here take and
return the runtime's tensors (batch size 1, no batch dim) and leave the final conv and SSM states in
the caller's state tensors, so snapshots and restores work exactly as on the torch path.

The packages are imported lazily, on the first call with a CUDA tensor, and never for a CPU
model: transformers, for one, picks these kernels at import time without looking at the device,
and a CPU process must not pay for (or trip over) a CUDA import.

Precision: the conv and the scan run in float32 whatever the model dtype, like the torch path
(its inputs are cast once; the results are the torch path's to ~1e-6 rather than bf16-rounded).
Triton computes float32 ``tl.dot`` in TF32 unless told otherwise, which would cost ~1e-3 of
relative accuracy, so ``TRITON_F32_DEFAULT`` defaults to ``ieee`` here (set it before the first
call to override). At batch size 1 the scan's matmuls are tiny; that costs no measurable time.

Knob (environment): ``GRANITE_LSP_CUDA_KERNELS=0`` keeps the torch path on CUDA too.

API versions these wrappers were written against (keyword arguments only, so later additions do
not matter): causal-conv1d's ``causal_conv1d_fn(x, weight, bias=None, seq_idx=None,
initial_states=None, return_final_states=False, final_states_out=None, activation=None)``
(channel-last x for initial/final states; versions without ``initial_states`` are not used), and
mamba_ssm 2.x's ``ops.triton.ssd_combined.mamba_chunk_scan_combined`` and
``ops.triton.selective_state_update.selective_state_update``.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

log = logging.getLogger(__name__)

ENV = "GRANITE_LSP_CUDA_KERNELS"
# Chunk length of mamba_ssm's SSD scan (Mamba2's own default; does not change results).
SCAN_CHUNK_SIZE = 256

_lock = threading.Lock()
# "conv" -> causal_conv1d_fn or None; "scan" -> (mamba_chunk_scan_combined, selective_state_update)
# or None; "errors" -> why either is None. Filled on first use, never for a CPU tensor.
_state: dict[str, object] = {"errors": {}}


def enabled() -> bool:
    """False when ``GRANITE_LSP_CUDA_KERNELS=0`` (read on every call: tests flip it)."""
    return os.environ.get(ENV, "1") != "0"


def _load(name: str, importer: Callable[[], object]) -> object | None:
    if name in _state:  # decided already: no lock on the decode path
        return _state[name]
    with _lock:
        if name in _state:
            return _state[name]
        try:
            value = importer()
        except Exception as e:  # not installed, built for another torch / CUDA, no Triton, ...
            value = None
            _state["errors"][name] = f"{type(e).__name__}: {e}"  # type: ignore[index]
            log.info("CUDA %s kernel unavailable, using the torch ops: %s", name, _state["errors"][name])  # type: ignore[index]
        _state[name] = value
        return value


def _import_conv() -> Callable[..., Any]:
    from causal_conv1d import causal_conv1d_fn

    params = inspect.signature(causal_conv1d_fn).parameters
    if "initial_states" not in params or "return_final_states" not in params:
        raise ImportError("causal_conv1d_fn has no initial_states / return_final_states (causal-conv1d too old)")
    return cast("Callable[..., Any]", causal_conv1d_fn)


def _import_scan() -> tuple[Callable[..., Any], Callable[..., Any]]:
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # before any kernel is compiled (docstring)
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined, selective_state_update


def _conv_fn() -> Callable[..., Any] | None:
    return _load("conv", _import_conv)  # type: ignore[return-value]


def _scan_fns() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    return _load("scan", _import_scan)  # type: ignore[return-value]


def _on_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and enabled() and torch.cuda.is_available()


def available(device: torch.device | str) -> bool:
    """Whether any of the kernels runs on ``device`` (imports the packages on the first call for a
    CUDA device; never for any other)."""
    return conv_available(device) or scan_available(device)


def conv_available(device: torch.device | str) -> bool:
    return _on_cuda(device) and _conv_fn() is not None


def scan_available(device: torch.device | str) -> bool:
    return _on_cuda(device) and _scan_fns() is not None


def describe(device: torch.device | str) -> str:
    """Which implementation the Mamba conv and scan use on ``device``, in words."""
    if torch.device(device).type != "cuda":
        return "conv: torch, scan: torch"
    conv_kind = "causal_conv1d" if conv_available(device) else "torch"
    scan_kind = "mamba_ssm" if scan_available(device) else "torch"
    text = f"conv: {conv_kind}, scan: {scan_kind}"
    if not enabled():
        text += f" ({ENV}=0)"
    elif errors():
        text += " (" + "; ".join(f"{k}: {v}" for k, v in sorted(errors().items())) + ")"
    return text


def errors() -> dict[str, str]:
    """Why a kernel is unavailable, by name ("conv", "scan"), for those tried and missing."""
    return dict(cast("dict[str, str]", _state["errors"]))


def conv(xbc: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """SiLU(causal depthwise conv) of ``xbc`` [T, C] (the raw in_proj columns, any dtype/strides)
    after ``conv_state`` [K-1, C] (the previous K-1 raw inputs, rows oldest first), with taps
    ``weight`` [C, K] and ``bias`` [C] (float32). Returns float32 [T, C] and leaves the last K-1
    raw inputs (partly old state when T < K-1) in ``conv_state``; None when the kernel is missing
    or does not take the shape (its channel-last path needs C % 8 == 0 and 2 <= K <= 4)."""
    T, C = xbc.shape
    K = weight.shape[1]
    if not xbc.is_cuda or not enabled() or C % 8 or not 2 <= K <= 4:
        return None
    fn = _conv_fn()
    if fn is None:
        return None
    # The kernel reads initial states only in its channel-last layout ([1, C, L] views with unit
    # channel stride, L stride a multiple of 8): fresh [1, L, C] float32 buffers, transposed.
    f32 = torch.float32
    x = torch.empty(1, T, C, dtype=f32, device=xbc.device)
    x[0].copy_(xbc)
    init = torch.empty(1, K - 1, C, dtype=f32, device=xbc.device)
    init[0].copy_(conv_state)
    out, final = fn(
        x.transpose(1, 2),
        weight,
        bias,
        initial_states=init.transpose(1, 2),
        return_final_states=True,
        activation="silu",
    )
    conv_state.copy_(final[0].t())  # [C, K-1] -> [K-1, C]; raw inputs, exact in the state's dtype
    return cast(Tensor, out[0].t())  # [C, T] with unit channel stride -> [T, C] row-major


def scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, ssm_state: Tensor, chunk_size: int = SCAN_CHUNK_SIZE
) -> Tensor | None:
    """The selective scan of ``ssm.ssm_recurrent`` / ``ssm.ssm_chunked`` on mamba_ssm's kernels: x
    [T, H, P], dt [T, H] (after softplus and clamp), A [H], B and C [T, G, N], float32 state [H, P, N]
    updated in place. Returns y [T, H, P] without the D skip (in x's dtype), or None without
    mamba_ssm. One token runs ``selective_state_update`` on the state itself; more run the chunked
    SSD scan from it and copy its final state back."""
    fns = _scan_fns() if x.is_cuda and enabled() else None
    if fns is None:
        return None
    chunk_scan, state_update = fns
    T, H, P = x.shape
    N = ssm_state.shape[-1]
    if T == 1:
        # Per-head dt and A broadcast over P (and N) through zero strides: the kernel's "tied"
        # case. dt is final already, so no softplus; the caller adds the D skip. Zero bias and D
        # rather than None: some versions read their strides unconditionally.
        zeros = dt.new_zeros(1, 1).expand(H, P)
        y = state_update(
            ssm_state.unsqueeze(0),
            x,
            dt.view(1, H, 1).expand(1, H, P),
            A.view(H, 1, 1).expand(H, P, N),
            B,
            C,
            D=zeros,
            z=None,
            dt_bias=zeros,
            dt_softplus=False,
        )
        return cast(Tensor, y.view(1, H, P))
    y, final = chunk_scan(
        x.unsqueeze(0),
        dt.unsqueeze(0),
        A,
        B.unsqueeze(0),
        C.unsqueeze(0),
        chunk_size,
        D=None,
        z=None,
        dt_bias=None,
        initial_states=ssm_state.unsqueeze(0),
        dt_softplus=False,
        return_final_states=True,
    )
    ssm_state.copy_(final[0])
    return cast(Tensor, y[0])
