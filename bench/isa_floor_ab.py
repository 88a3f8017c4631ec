"""The AVX2 floor against the commit before the ISA work: same work, same run, alternating rounds.

Issue 14: "with the ISA forced to AVX2, nothing is slower than today's figures (same run, ratio)",
today being 3469b23, the last commit before the ISA levels. For each precision this starts two
timing children, one per tree, on the real Granite-4.0-H-350M shape with random weights and
``--threads`` threads:

- **base**: a checkout of ``--base-commit`` (``--base DIR``; a detached git worktree is added there
  when DIR does not exist), its kernels built into ``DIR/.kernel-cache``;
- **this**: this checkout with ``GRANITE_LSP_ISA=avx2``.

Each child runs its own tree's code: ``PYTHONPATH`` and the working directory are that tree, and
the child reports the file ``granite_lsp`` was imported from (an editable install elsewhere could
shadow it), which must lie in that tree, and the ISA level its kernels run at (``avx2`` here; the
base has no levels). Both build the model with the API the two trees share
(``HybridModel.from_config``, ``new_state``, ``forward``, ``snapshot``/``restore``) and the same
token ids (a seeded generator, checked by a hash). Then, round by round, the parent asks each child
in turn for one prefill of ``--prefill`` tokens from an empty state (the side that goes first
alternates), then restores both to a snapshot after ``--depth`` tokens (default: the prefill's
length) and asks for ``--decode`` decode steps, one step at a time from each side in turn (ABBA):
on this shared machine the load moves within seconds, and a step is tens of milliseconds. A
waiting child blocks on its pipe (its kernels' pool sleeps after 0.5 ms), so only one side runs at
a time. The first round is warm-up.

It prints per precision the ratios this / base as speeds (above 1.00 this tree is faster: the
ratio of the medians, and the range of the per-round ratios) and the raw medians (prefill tok/s,
decode median step in ms), on the wall clock (the issue's figure) and on each side's process CPU
time (both threads; on a loaded machine far steadier, though it also counts a pool's spinning);
``--json`` also writes every sample.

    .venv/bin/python bench/isa_floor_ab.py [--base /tmp/granite-lsp-floor-base] [--repeat 3] \\
        [--precisions float32,bfloat16,float16,int8] [--prefill 512 --decode 32] [--json out.json]

The whole default run (four precisions, --repeat 3) takes ~5-10 minutes on 2 quiet cores, plus a
one-time build of the base's kernels. On a loaded machine only the same-run ratios mean much.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
BASE_COMMIT = "3469b23"
SIDES = ("base", "this")
PRECISIONS = ("float32", "bfloat16", "float16", "int8")  # bench/shape.py's names, in both trees


# -- the timing child: runs inside one tree, imports only what both trees have ------------------


def _child(args: argparse.Namespace) -> None:
    """Builds the model, answers "ready", then times what the parent asks on stdin, one JSON line each."""
    import torch

    import granite_lsp
    from granite_lsp.bench.shape import PRECISIONS, real_config
    from granite_lsp.runtime.model import HybridModel

    torch.set_num_threads(args.threads)
    dtype, quantize = PRECISIONS[args.precision]
    model = HybridModel.from_config(real_config(), dtype=dtype, quantize=quantize)
    gen = torch.Generator().manual_seed(args.seed)
    n = max(args.prefill, args.depth + args.decode)
    ids = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
    try:
        from granite_lsp.kernels import isa  # type: ignore[attr-defined, unused-ignore]

        level: str | None = isa.level()
    except ImportError:
        level = "none (before ISA levels: avx2 only)"

    def prefill() -> dict[str, float]:
        state = model.new_state(args.prefill + 8)
        t0, c0 = time.perf_counter(), time.process_time()
        model.forward(ids[: args.prefill], state)
        return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    state = model.new_state(args.depth + args.decode + 8)
    model.forward(ids[: args.depth], state)
    snap = state.snapshot()

    at = [args.depth]  # the next decode step's position

    def restore() -> dict[str, int]:
        state.restore(snap)
        at[0] = args.depth
        return {"pos": at[0]}

    def step() -> dict[str, float]:
        if at[0] >= args.depth + args.decode:
            raise SystemExit(f"more than --decode {args.decode} steps after a restore")
        t0, c0 = time.perf_counter(), time.process_time()
        model.forward(ids[at[0] : at[0] + 1], state)
        at[0] += 1
        return {"wall_ms": (time.perf_counter() - t0) * 1e3, "cpu_ms": (time.process_time() - c0) * 1e3}

    ready = {
        "module": granite_lsp.__file__,
        "isa_level": level,
        "packed": model.packed,
        "threads": torch.get_num_threads(),
        "weight_mb": model.weight_bytes() / 2**20,
        "ids_sha1": hashlib.sha1(ids.numpy().tobytes()).hexdigest(),
    }
    print(json.dumps(ready), flush=True)
    actions: dict[str, Callable[[], dict[str, Any]]] = {"prefill": prefill, "restore": restore, "step": step}
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print(json.dumps(actions[line.strip()]()), flush=True)


# -- the parent: two children per precision, alternating rounds -----------------------------------


def _git(*argv: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *argv], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def base_tree(path: Path, commit: str) -> Path:
    """``path`` as a checkout of ``commit``: added as a detached worktree when it does not exist,
    else checked to be at that commit."""
    want = _git("rev-parse", f"{commit}^{{commit}}")
    if not path.exists():
        print(f"adding a worktree of {commit} at {path}", flush=True)
        _git("worktree", "add", "--detach", str(path), want)
    try:
        head = _git("rev-parse", "HEAD", cwd=path)
    except subprocess.CalledProcessError:
        raise SystemExit(f"{path} exists and is not a git checkout: give --base another directory") from None
    if head != want:
        raise SystemExit(f"{path} is at {head[:9]}, not {commit} ({want[:9]}): give --base another directory")
    return path.resolve()


class Child:
    """One side's timing child (a subprocess running this file with ``--child`` in ``tree``)."""

    def __init__(self, side: str, tree: Path, env: dict[str, str], child_args: list[str]) -> None:
        self.side, self.tree = side, tree
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *child_args]
        full_env = {**os.environ, "PYTHONPATH": str(tree), "GRANITE_LSP_REQUIRE_KERNELS": "1", **env}
        self.proc = subprocess.Popen(
            cmd, cwd=tree, env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def _read(self) -> Any:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        line = out.readline()
        if not line:
            code = self.proc.wait()
            print(f"the {self.side} child ({self.tree}) exited with {code}", file=sys.stderr)
            raise SystemExit(code or 1)
        return json.loads(line)

    def ready(self) -> dict[str, Any]:
        info: dict[str, Any] = self._read()
        if not Path(info["module"]).resolve().is_relative_to(self.tree):
            raise SystemExit(f"the {self.side} child imported {info['module']}, not {self.tree}'s granite_lsp")
        if not info["packed"]:
            raise SystemExit(f"the {self.side} child runs without the CPU kernels")
        return info

    def ask(self, what: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Asks the child to quit (it may have died already: the other side's failure ends both)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_precision(precision: str, trees: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Every sample of one precision, both sides, ``args.repeat`` rounds after a warm-up round."""
    child_args = [f"--precision={precision}", f"--prefill={args.prefill}", f"--decode={args.decode}"]
    child_args += [f"--depth={args.depth}", f"--threads={args.threads}", f"--seed={args.seed}"]
    envs = {
        "base": {"GRANITE_LSP_KERNEL_CACHE": str(trees["base"] / ".kernel-cache")},
        "this": {"GRANITE_LSP_ISA": "avx2"},
    }
    children = {side: Child(side, trees[side], envs[side], child_args) for side in SIDES}
    try:
        info = {side: c.ready() for side, c in children.items()}
        if info["this"]["isa_level"] != "avx2":
            raise SystemExit(f"this tree's kernels run at {info['this']['isa_level']}, not avx2")
        if info["base"]["ids_sha1"] != info["this"]["ids_sha1"]:
            raise SystemExit("the two sides drew different token ids")
        samples: dict[str, dict[str, list[Any]]] = {s: {"prefill": [], "decode": []} for s in SIDES}
        for r in range(args.repeat + 1):
            for side in SIDES if r % 2 else SIDES[::-1]:
                got = children[side].ask("prefill")
                if r:  # round 0 warms up
                    samples[side]["prefill"].append(got)
            steps = decode_round(children, args.decode)
            if r:
                for side in SIDES:
                    samples[side]["decode"].append(steps[side])
                print(f"  {precision} round {r}/{args.repeat}: {_round_line(samples)}", flush=True)
    finally:
        for c in children.values():
            c.close()
    return {"sides": info, "samples": samples, "summary": summarize(samples)}


def decode_round(children: dict[str, Child], n: int) -> dict[str, dict[str, list[float]]]:
    """Both sides restored to the snapshot, then ``n`` decode steps each, interleaved step by step
    (ABBA): the two step series see the same seconds of the machine. (A step streams every weight,
    far more than the caches hold, so the other side's step between two of one side's evicts
    little that it would have kept.)"""
    for c in children.values():
        c.ask("restore")
    out: dict[str, dict[str, list[float]]] = {side: {"wall_ms": [], "cpu_ms": []} for side in SIDES}
    for i in range(n):
        for side in SIDES if i % 2 else SIDES[::-1]:
            got = children[side].ask("step")
            out[side]["wall_ms"].append(got["wall_ms"])
            out[side]["cpu_ms"].append(got["cpu_ms"])
    return out


def _round_line(samples: dict[str, dict[str, list[Any]]]) -> str:
    b, t = samples["base"], samples["this"]
    pf = b["prefill"][-1]["wall_s"] / t["prefill"][-1]["wall_s"]
    dc = statistics.median(b["decode"][-1]["wall_ms"]) / statistics.median(t["decode"][-1]["wall_ms"])
    return f"prefill x{pf:.3f}, decode x{dc:.3f}"


def _ratios(samples: dict[str, dict[str, list[Any]]], clock: str) -> dict[str, Any]:
    """On one clock ("wall" or "cpu"): each side's medians, and this / base as speeds (above 1: this
    tree faster), of the medians and per round."""
    med = statistics.median
    out: dict[str, Any] = {}
    for side in SIDES:
        s = samples[side]
        out[side] = {
            "prefill_s": med(x[f"{clock}_s"] for x in s["prefill"]),
            "decode_ms": med(ms for rnd in s["decode"] for ms in rnd[f"{clock}_ms"]),
        }
    b, t = samples["base"], samples["this"]
    out["prefill"] = out["base"]["prefill_s"] / out["this"]["prefill_s"]
    out["decode"] = out["base"]["decode_ms"] / out["this"]["decode_ms"]
    out["prefill_rounds"] = [x[f"{clock}_s"] / y[f"{clock}_s"] for x, y in zip(b["prefill"], t["prefill"], strict=True)]
    out["decode_rounds"] = [
        med(x[f"{clock}_ms"]) / med(y[f"{clock}_ms"]) for x, y in zip(b["decode"], t["decode"], strict=True)
    ]
    return out


def summarize(samples: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """The ratios on the wall clock (issue 14's figure) and on the process's CPU time (both threads:
    on a loaded machine far steadier, but it also counts a pool's spinning)."""
    return {"wall": _ratios(samples, "wall"), "cpu": _ratios(samples, "cpu")}


def _load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nthis tree at GRANITE_LSP_ISA=avx2 / base {args.base_commit}: speed ratios (above 1.00 this is faster)"
        f" of the medians, and the range of the {args.repeat} alternating rounds' ratios; {args.threads} threads"
    )
    print(
        f"prefill of {args.prefill} tokens; decode: median step over {args.decode} steps x rounds at depth {args.depth}"
    )
    print(f"{'':16s}{'prefill':>9s}{'rounds':>12s}{'decode':>9s}{'rounds':>12s}   medians base, this")
    for precision, res in results.items():
        for clock in ("wall", "cpu"):
            r = res["summary"][clock]
            pr, dr = r["prefill_rounds"], r["decode_rounds"]
            b, t = r["base"], r["this"]
            if clock == "wall":
                medians = f"prefill {args.prefill / b['prefill_s']:.1f}, {args.prefill / t['prefill_s']:.1f} tok/s;"
                medians += f" step {b['decode_ms']:.1f}, {t['decode_ms']:.1f} ms"
            else:
                medians = f"prefill {b['prefill_s']:.3f}, {t['prefill_s']:.3f} CPU s;"
                medians += f" step {b['decode_ms']:.1f}, {t['decode_ms']:.1f} CPU ms"
            print(
                f"{precision if clock == 'wall' else '':10s}{clock:>6s} x{r['prefill']:.3f}{min(pr):6.2f}-{max(pr):.2f}"
                f" x{r['decode']:.3f}{min(dr):6.2f}-{max(dr):.2f}   {medians}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=Path("/tmp/granite-lsp-floor-base"), help="the base checkout")
    ap.add_argument("--base-commit", default=BASE_COMMIT)
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill")
    ap.add_argument("--decode", type=int, default=32, help="decode steps per round")
    ap.add_argument("--depth", type=int, help="tokens before the decode steps (default: --prefill)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="of the token ids")
    ap.add_argument("--json", type=Path, help="also write every sample here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.depth is None:
        args.depth = args.prefill
    if args.child:
        _child(args)
        return 0
    unknown = set(args.precisions.split(",")) - set(PRECISIONS)
    if unknown:
        ap.error(f"unknown precisions {', '.join(sorted(unknown))}: some of {', '.join(PRECISIONS)}")
    trees = {"base": base_tree(args.base, args.base_commit), "this": REPO}
    print(f"base {trees['base']} ({args.base_commit}), this {REPO} ({_git('rev-parse', '--short', 'HEAD')}), {_load()}")
    results: dict[str, dict[str, Any]] = {}
    for precision in args.precisions.split(","):
        t0 = time.perf_counter()
        results[precision] = run_precision(precision, trees, args)
        print(f"  {precision}: {time.perf_counter() - t0:.0f} s, {_load()}", flush=True)
    report(results, args)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("child", "precision")}
        meta["base"] = str(trees["base"])
        args.json.write_text(json.dumps({"args": meta, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
