"""Speed of the runtime on the real Granite-4.0-H-350M shape with random weights.

Run ``python -m granite_lsp.runtime.microbench [--sweep]``. Speed does not depend on weight
values, so no checkpoint is needed. Besides decode and prefill throughput it times the model's
matmuls alone (``F.linear`` over the same weights, lm_head included): decode on CPU is bound by
streaming those weights from memory, so "decode time / linear time" says how much is left to
gain outside the matmuls. ``--sweep`` also times the scan chunk sizes and the recurrent/scan
threshold that the defaults in ``model.py`` were chosen from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .matmul import linear
from .model import HybridModel
from .ssm import ssm_chunked

REAL_CONFIG = Path(__file__).resolve().parents[2] / "model" / "granite-4.0-h-350m" / "config.json"
_ATTN = {10, 13, 17, 27}
# The published shape, used when model/granite-4.0-h-350m/config.json is absent.
FALLBACK_CONFIG = {
    "vocab_size": 100352,
    "hidden_size": 768,
    "num_hidden_layers": 32,
    "layer_types": ["attention" if i in _ATTN else "mamba" for i in range(32)],
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "shared_intermediate_size": 2048,
    "num_local_experts": 0,
    "mamba_n_heads": 48,
    "mamba_d_head": 32,
    "mamba_d_state": 128,
    "mamba_n_groups": 1,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "attention_multiplier": 0.015625,
    "embedding_multiplier": 12,
    "residual_multiplier": 0.246,
    "logits_scaling": 3,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.1,
    "tie_word_embeddings": True,
    "position_embedding_type": "nope",
}


def real_config() -> dict:
    return json.loads(REAL_CONFIG.read_text()) if REAL_CONFIG.is_file() else FALLBACK_CONFIG


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up: on a shared machine other load only
    ever adds time, so the minimum is the least noisy estimate of what the code costs."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return min(samples)


def linear_weights(model: HybridModel) -> list[torch.Tensor]:
    """Every matrix a decode step multiplies by, in order (the tied lm_head last)."""
    ws: list[torch.Tensor] = []
    for blk in model.blocks:
        mix = blk.mixer
        ws += [mix.w_in, mix.w_out] if blk.kind == "mamba" else [mix.wqkv, mix.wo]  # type: ignore[union-attr]
        ws += [blk.mlp.w_in, blk.mlp.w_out]
    return ws + [model.lm_head]


def time_linears(model: HybridModel, T: int, repeat: int, fn: Callable[..., torch.Tensor] = F.linear) -> float:
    """Seconds for the model's matmuls alone on T rows (lm_head on the last row only)."""
    ws = linear_weights(model)
    xs = [torch.randn(T, w.shape[1], dtype=model.dtype) for w in ws[:-1]]
    x_head = torch.randn(1, model.lm_head.shape[1], dtype=model.dtype)

    def run() -> None:
        with torch.inference_mode():
            for w, x in zip(ws[:-1], xs, strict=True):
                fn(x, w)
            fn(x_head, ws[-1])

    return _time(run, repeat)


def bench_model(model: HybridModel, prefill: int, decode: int, repeat: int) -> dict[str, float]:
    ids = torch.randint(0, model.config.vocab_size, (prefill + decode,))

    def do_prefill() -> None:
        model.forward(ids[:prefill], model.new_state(prefill + decode))

    t_prefill = _time(do_prefill, repeat)
    state = model.new_state(prefill + decode + 1)
    model.forward(ids[:prefill], state)
    snap = state.snapshot()
    steps = []
    for r in range(repeat):
        state.restore(snap)
        for i in range(decode):
            t0 = time.perf_counter()
            model.forward(ids[prefill + i : prefill + i + 1], state)
            if r or i:  # first step of the first round is warm-up
                steps.append(time.perf_counter() - t0)
    t_step = min(steps)
    t_step_median = statistics.median(steps)
    t_lin1 = time_linears(model, 1, max(5, repeat * 3))
    t_linp = time_linears(model, prefill, repeat, linear)  # the runtime's kernel choice for T rows
    return {
        "prefill_tok_s": prefill / t_prefill,
        "prefill_s": t_prefill,
        "prefill_linear_s": t_linp,
        "decode_tok_s": 1.0 / t_step,
        "decode_ms": t_step * 1e3,
        "decode_median_ms": t_step_median * 1e3,
        "linear_ms": t_lin1 * 1e3,
    }


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

            def scan(cs: int = cs, args: tuple = (x, dt, A, B, C)) -> None:
                with torch.inference_mode():
                    ssm_chunked(*args, torch.zeros(H, P, N), cs)

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--sweep", action="store_true", help="also time chunk sizes and the recurrent threshold")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = real_config()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"hidden {cfg.get('hidden_size')} x {cfg.get('num_hidden_layers')} layers"
    )
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        model = HybridModel.from_config(cfg, dtype=dtype)
        r = bench_model(model, args.prefill, args.decode, args.repeat)
        print(
            f"{name:9s} decode {r['decode_tok_s']:6.2f} tok/s ({r['decode_ms']:.1f} ms/step after {args.prefill}, "
            f"median {r['decode_median_ms']:.1f}; F.linear alone {r['linear_ms']:.1f} ms, "
            f"ratio {r['decode_ms'] / r['linear_ms']:.2f})"
        )
        print(
            f"{'':9s} prefill {r['prefill_tok_s']:6.1f} tok/s ({r['prefill_s']:.2f} s for {args.prefill}; "
            f"its linears alone {r['prefill_linear_s']:.2f} s, ratio {r['prefill_s'] / r['prefill_linear_s']:.2f})"
        )
        if args.sweep:
            sweep_chunk_sizes(model, args.repeat)
            sweep_threshold(model, args.repeat)
        del model


if __name__ == "__main__":
    main()
