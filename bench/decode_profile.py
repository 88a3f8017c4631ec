"""Where a decode step's time goes, on the real shape: each kind of matmul against the read bound,
and the work between them (the Mamba mixer at T = 1, the norms, SwiGLU, attention).

    .venv/bin/python bench/decode_profile.py [--precisions bfloat16,float16] [--depth 512] [--rounds 7]

Random weights of Granite-4.0-H-350M's shape (speed does not depend on their values). After
``depth`` prompt tokens, in alternating rounds (every part sees the same machine), it times one
decode step (the one-call step, kernels/step.cpp) and each part of it alone, run as often as the
step runs it, through the same kernels on the model's own weights and on states of the same sizes:
each matmul kind (``PackedLinear.product``, one row), the mixer between in_proj and out_proj, the
residual add + RMSNorm pairs, SwiGLU, attention at that depth. It prints medians, each matmul
kind's GB/s and its fraction of the 2-thread read bandwidth measured in the same rounds
(``read_probe``, the bench's ceiling), and "rest" = step - the parts' sum (the call's own overhead).
On a shared machine the absolute times are noisy; the fractions of one round are what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from granite_lsp.bench.shape import PRECISIONS, real_config  # noqa: E402
from granite_lsp.kernels import PackedLinear, isa, read_probe  # noqa: E402
from granite_lsp.runtime import HybridModel  # noqa: E402
from granite_lsp.runtime.layers import MambaMixer  # noqa: E402
from granite_lsp.runtime.matmul import matmul_threads  # noqa: E402


def parts(model: HybridModel, state: object, threads: int) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (one step's worth of that part, bytes of weights it reads (0: not a matmul))."""
    kern = model.kernels
    assert kern is not None, "the kernels are needed"
    cfg = model.config
    D = cfg.hidden_size
    groups: dict[str, list[PackedLinear]] = {}
    mixers: list[MambaMixer] = []
    for blk in model.blocks:
        mix = blk.mixer
        if isinstance(mix, MambaMixer):
            groups.setdefault("in_proj", []).append(mix.w_in)  # type: ignore[arg-type]
            groups.setdefault("out_proj", []).append(mix.w_out)  # type: ignore[arg-type]
            mixers.append(mix)
        else:
            groups.setdefault("qkv", []).append(mix.wqkv)  # type: ignore[union-attr]
            groups.setdefault("o", []).append(mix.wo)  # type: ignore[union-attr]
        groups.setdefault("mlp_in", []).append(blk.mlp.w_in)  # type: ignore[arg-type]
        groups.setdefault("mlp_out", []).append(blk.mlp.w_out)  # type: ignore[arg-type]
    groups["lm_head"] = [model.lm_head]  # type: ignore[list-item]
    out: dict[str, tuple[Callable[[], object], int]] = {}
    for name, ws in groups.items():
        xs = [torch.randn(1, w.in_features) for w in ws]

        def run(ws: list[PackedLinear] = ws, xs: list[torch.Tensor] = xs) -> None:
            for w, x in zip(ws, xs, strict=True):
                w.product(x, threads)

        out[name] = (run, sum(w.nbytes for w in ws))
    st = state
    conv = [t.clone() for t in st.conv]  # type: ignore[attr-defined]
    ssm = [t.clone() for t in st.ssm]  # type: ignore[attr-defined]
    zs = [torch.randn(1, m.w_in.out_features) for m in mixers]  # type: ignore[union-attr]

    def mixer() -> None:
        for m, z, c, s in zip(mixers, zs, conv, ssm, strict=True):
            args = (m.dt_bias, m.A, m.D, s, m.norm_w32, m.G, m.eps, m.dt_min, m.dt_max, threads)
            kern.mamba_mixer(z, c, m.conv_w, m.conv_b, *args)

    out["mamba_mixer"] = (mixer, 0)
    x = torch.randn(1, D)
    h = torch.randn(1, D) * 1e-3
    lnw = torch.ones(D)
    n_norms = 2 * len(model.blocks)

    def norms() -> None:
        for _ in range(n_norms):
            kern.add_rms_norm(x, h, 1e-3, lnw, 1e-5, threads)

    out["add_rms_norm"] = (norms, 0)
    gu = torch.randn(1, 2 * cfg.shared_intermediate_size)

    def swiglu() -> None:
        for _ in model.blocks:
            kern.swiglu(gu, threads)

    out["swiglu"] = (swiglu, 0)
    kv = st.kv  # type: ignore[attr-defined]
    if kv.k:
        pos = int(st.pos)  # type: ignore[attr-defined]
        q = torch.randn(cfg.num_attention_heads * cfg.head_dim)

        def attention() -> None:
            for kb, vb in zip(kv.k, kv.v, strict=True):
                kern.attention_decode(q, kb, vb, pos + 1, cfg.attention_multiplier, threads)

        out["attention"] = (attention, 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="bfloat16,float16")
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4, help="decode steps timed per round")
    args = ap.parse_args()
    torch.manual_seed(0)
    threads = matmul_threads()
    print(f"isa level {isa.level()}, threads {threads}, depth {args.depth}")
    probe = torch.ones(256 << 18)  # 256 MB
    for prec in args.precisions.split(","):
        dtype, quantize = PRECISIONS[prec]
        model = HybridModel.from_config(real_config(), dtype=dtype, quantize=quantize)
        ids = torch.randint(0, model.config.vocab_size, (args.depth + args.steps,))
        state = model.new_state(args.depth + args.steps + 1)
        with torch.inference_mode():
            model.forward(ids[: args.depth], state)
            snap = state.snapshot()
            ps = parts(model, state, threads)
            times: dict[str, list[float]] = {k: [] for k in ["step", *ps, "probe"]}
            for r in range(args.rounds + 1):
                state.restore(snap)
                steps = []
                for i in range(args.steps):
                    t0 = time.perf_counter()
                    model.forward(ids[args.depth + i : args.depth + i + 1], state)
                    steps.append(time.perf_counter() - t0)
                for name, (fn, _) in ps.items():
                    t0 = time.perf_counter()
                    fn()
                    if r:
                        times[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                read_probe(probe, threads)
                if r:
                    times["probe"].append(time.perf_counter() - t0)
                    times["step"].append(statistics.median(steps))
        med = {k: statistics.median(v) for k, v in times.items()}
        bw = probe.nbytes / med["probe"]
        weights = sum(nb for _, nb in ps.values())
        print(f"\n{prec}: step {med['step'] * 1e3:.2f} ms, weights {weights / 1e6:.0f} MB per step,")
        print(f"  read bandwidth {bw / 1e9:.1f} GB/s: bound {weights / bw * 1e3:.2f} ms = "
              f"{weights / bw / med['step'] * 100:.0f}% of the step")  # fmt: skip
        total = 0.0
        for name, (_, nb) in ps.items():
            t = med[name]
            total += t
            extra = f"  {nb / t / 1e9:5.1f} GB/s = {nb / t / bw * 100:4.0f}% of read bw" if nb else ""
            print(f"  {name:13} {t * 1e3:7.2f} ms {t / med['step'] * 100:5.1f}%{extra}")
        rest = med["step"] - total
        print(f"  {'rest':13} {rest * 1e3:7.2f} ms {rest / med['step'] * 100:5.1f}%")
        del model


if __name__ == "__main__":
    main()
