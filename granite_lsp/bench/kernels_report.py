"""What ``bench --kernels`` prints per precision: our medians, llama.cpp's from the same rounds and
the ratios (or, without llama.cpp in the run, issue #4's llama-bench figures for orientation)."""

from __future__ import annotations

from typing import Any

import torch

from .shape import LLAMA_CPP

# llama-bench -t 2 on the real shape, on the 2-core AVX2 machine of issue #4 (another day): tg128 /
# pp512 tokens/s, printed for orientation when llama.cpp does not run in this bench.
LLAMA_BENCH_ISSUE4 = {"f32": (13.8, 130.0), "f16": (26.4, 215.0), "q8_0": (35.9, 161.0)}


# The report's name of each figure compared with llama.cpp's fastest path.
_FIGURE = {"decode_tok_s": "decode", "decode0_tok_s": "depth 0", "prefill_tok_s": "prefill"}


def _print_cpu(name: str, r: dict[str, Any], packed: bool, prefill: int) -> None:
    """One precision's CPU figures (medians), and llama.cpp's from the same rounds per path (GGUF
    kind, and its configuration: see ``llama_baseline.start_paths``; a path that crashed is named
    with its status, one whose batches crash has its decode figures and its prefill named crashed),
    or without llama.cpp in the run issue #4's llama-bench figures, with ours / theirs."""
    layered = r["decode_layered_ms"]
    print(
        f"\n{name} (weights {r['weight_mb']:.0f} MB, {'packed kernels' if packed else 'torch matmuls'}), medians\n"
        f"  decode at depth {r['decode_depth']}: {r['decode_tok_s']:6.2f} tok/s ({r['decode_ms']:.1f} ms/step,"
        f" best {r['decode_best_ms']:.1f});  at depth 0: {r['decode0_tok_s']:6.2f} tok/s ({r['decode0_ms']:.1f} ms)\n"
        + (
            f"  decode step layer by layer (no one-call step) {layered:.1f} ms:"
            f" x{layered / r['decode_ms']:.2f} the one-call step\n"
            if layered
            else ""
        )
        + f"  prefill {prefill}: {r['prefill_tok_s']:6.1f} tok/s ({r['prefill_s']:.2f} s;"
        f" best {r['prefill_best_tok_s']:.1f} tok/s)\n"
        f"  matmuls alone, 1 token: ours {r['linear_ms']:.1f} ms, torch {r['torch_linear_ms']:.1f} ms"
        f"  ->  decode step / ours {r['decode_ms'] / r['linear_ms']:.2f}x,"
        f" / torch {r['decode_ms'] / r['torch_linear_ms']:.2f}x\n"
        f"  matmuls alone, {prefill} tokens: {r['prefill_linear_s']:.2f} s"
        f"  ->  prefill / matmuls {r['prefill_s'] / r['prefill_linear_s']:.2f}x"
    )
    ran = {label: t for label, t in r["llama"].items() if "failed" not in t}
    for label, t in r["llama"].items():
        config = t.get("config")
        if label not in ran:
            print(f"  llama.cpp {label.upper()}{f' ({config})' if config else ''}: {t['failed']}")
            continue
        prefill_figure = (
            f"prefill {t['prefill_failed']}"
            if "prefill_failed" in t
            else f"prefill {t['prefill_tok_s']:6.1f} tok/s: ours x{r['prefill_tok_s'] / t['prefill_tok_s']:.2f}"
        )
        print(
            f"  llama.cpp {label.upper()} same rounds: decode depth {r['decode_depth']}"
            f" {t['decode_tok_s']:6.2f} tok/s"
            f" ({t['decode_ms']:.1f} ms): ours x{r['decode_tok_s'] / t['decode_tok_s']:.2f};"
            f"  depth 0 {t['decode0_tok_s']:6.2f}: ours x{r['decode0_tok_s'] / t['decode0_tok_s']:.2f};"
            f"  {prefill_figure}" + (f"\n    {config}" if config else "")
        )
    # per figure, among the paths that have it (one whose batches crash has decode figures alone)
    keys = [k for k in ("decode_tok_s", "decode0_tok_s", "prefill_tok_s") if any(k in t for t in ran.values())]
    fastest = {k: max((t[k], label) for label, t in ran.items() if k in t)[1] for k in keys}
    if fastest:
        print(
            "  vs llama.cpp's fastest path here: "
            + ", ".join(f"{_FIGURE[k]} x{r[k] / ran[fastest[k]][k]:.2f} ({fastest[k].upper()})" for k in keys)
        )
    if r["llama"]:
        return
    for kind in LLAMA_CPP[name]:
        if kind in LLAMA_BENCH_ISSUE4:
            tg, pp = LLAMA_BENCH_ISSUE4[kind]
            print(
                f"  llama-bench {kind.upper()} (issue #4's machine, not this run): tg128 {tg}, pp512 {pp}:"
                f" ours x{r['decode0_tok_s'] / tg:.2f} (depth 0), x{r['prefill_tok_s'] / pp:.2f}"
            )


def _print_gpu(name: str, r: dict[str, Any], device: torch.device, prefill: int) -> None:
    print(
        f"\n{name} on {device} (weights {r['weight_mb']:.0f} MB)\n"
        f"  decode  {r['decode_tok_s']:7.1f} tok/s  "
        f"({r['decode_ms']:.2f} ms/step median, best {r['decode_best_ms']:.2f})\n"
        f"  prefill {r['prefill_tok_s']:7.0f} tok/s  ({r['prefill_s'] * 1e3:.1f} ms)\n"
        f"  matmuls alone, 1 token: {r['linear_ms']:.2f} ms (torch F.linear {r['torch_linear_ms']:.2f} ms);"
        f" {prefill} tokens: {r['prefill_linear_s'] * 1e3:.1f} ms"
    )
