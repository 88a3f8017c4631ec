"""``bench --kernels --sweep``: the scan chunk sizes and the recurrent/scan threshold that the
defaults in ``runtime/model.py`` were chosen from."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..runtime.model import HybridModel
from ..runtime.ssm import ssm_chunked
from .timing import _time


def _scan_from_zero(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int
) -> None:
    with torch.inference_mode():
        ssm_chunked(x, dt, A, B, C, x.new_zeros(x.shape[1], x.shape[2], B.shape[2]), chunk_size)


def sweep_chunk_sizes(model: HybridModel, repeat: int) -> None:
    """The chunk size only changes the SSD scan, so time the scan alone (x28 Mamba layers)."""
    cfg = model.config
    H, P, N, G = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state, cfg.mamba_n_groups
    n_layers = len(cfg.mamba_layers)
    A = -torch.arange(1, H + 1, dtype=torch.float32)
    print(f"  scan alone x{n_layers} layers (seconds) by chunk size:")
    for T in (256, 512, 1024, 2048):
        x, B, C = torch.randn(T, H, P), torch.randn(T, G, N), torch.randn(T, G, N)
        dt = F.softplus(torch.randn(T, H))
        row = []
        for cs in (32, 64, 128, 256):
            scan = functools.partial(_scan_from_zero, x, dt, A, B, C, cs)
            row.append(f"{cs}: {_time(scan, repeat) * n_layers:.3f}")
        print(f"    T={T:5d}  " + "  ".join(row))


def sweep_threshold(model: HybridModel, repeat: int) -> None:
    """Continuing by T tokens: per-token recurrence vs chunked scan, whole model."""
    saved = model.recurrent_max
    print("  continuation of T tokens after 256 (ms): recurrent vs scan")
    ids = torch.randint(0, model.config.vocab_size, (256 + 32,))
    state = model.new_state(512)
    model.forward(ids[:256], state)
    snap = state.snapshot()
    for T in (1, 2, 4, 6, 8, 12, 16, 24, 32):
        res = []
        for rmax in (10**9, 0):
            model.recurrent_max = rmax

            def cont(T: int = T) -> None:
                state.restore(snap)
                model.forward(ids[256 : 256 + T], state)

            res.append(_time(cont, repeat) * 1e3)
        print(f"    T={T:3d}  recurrent {res[0]:7.1f}  scan {res[1]:7.1f}")
    model.recurrent_max = saved
