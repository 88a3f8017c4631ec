"""llama.cpp timed beside our runtime, in the same bench run, as the baseline its ratios use.

The bench (``microbench.py --llama-cpp DIR``) starts this file as a child process under an
interpreter that has llama-cpp-python (``--llama-cpp-python``: llama.cpp wants its own venv, and
its OpenMP runtime and ours should not share a process), then alternates: our prefill, this
prefill, our decode steps, these decode steps. The machine's moment then weighs on both sides of
each ratio, where llama-bench figures from another day did not. This file imports nothing from
granite_lsp, so that it runs in that other venv.

Protocol: one JSON object a line on stdin, one answer a line on stdout.
``{"op": "prefill", "tokens": [...]}`` -> ``{"s": seconds}`` (from an empty context);
``{"op": "decode", "tokens": [...], "steps": [...]}`` -> ``{"s": [seconds per step]}`` (the
tokens are evaluated untimed first, then each step token alone, as a decode step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", help="the model file (llama.cpp's GGUF)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    args = ap.parse_args()
    from llama_cpp import Llama

    # As llama-bench runs pp512: the whole prompt in one graph, flash attention on (its "auto" on CPU).
    llm = Llama(
        model_path=args.gguf,
        n_ctx=args.ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=True,
        verbose=False,
    )
    print(json.dumps({"ready": True, "n_vocab": llm.n_vocab()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        llm.reset()  # clears the KV cache and the recurrent states
        if req["op"] == "prefill":
            t0 = time.perf_counter()
            llm.eval(req["tokens"])
            out: dict[str, object] = {"s": time.perf_counter() - t0}
        elif req["op"] == "decode":
            llm.eval(req["tokens"])
            steps = []
            for tok in req["steps"]:
                t0 = time.perf_counter()
                llm.eval([tok])
                steps.append(time.perf_counter() - t0)
            out = {"s": steps}
        else:
            out = {"error": f"unknown op {req['op']!r}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
