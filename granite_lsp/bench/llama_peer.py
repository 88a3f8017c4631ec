"""llama.cpp timed on request, in a child process of the bench (see llama_baseline.py).

This file imports nothing from granite_lsp: it runs under another interpreter, one that has
llama-cpp-python. Protocol: one JSON object a line on stdin, one answer a line on stdout. First
it answers ``{"ready": true, "n_vocab": V}`` (or ``{"error": ...}`` if the model does not load),
then to ``{"op": "prefill", "tokens": [...]}`` with ``{"s": seconds}`` (from an empty context),
and to ``{"op": "decode", "tokens": [...], "steps": [...]}`` with ``{"s": [seconds per step]}``
(the tokens evaluated untimed first, then each step token alone, as a decode step). A request
that fails is answered with ``{"error": ...}`` and the next one is served.
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
    ap.add_argument("--ctx", type=int, default=2048, help="context size: at least the longest request")
    args = ap.parse_args()

    def answer(out: dict[str, object]) -> None:
        print(json.dumps(out), flush=True)

    try:
        from llama_cpp import Llama
    except ImportError as e:
        answer({"error": f"{sys.executable} cannot import llama_cpp (pip install llama-cpp-python there): {e}"})
        return
    try:
        # As llama-bench runs pp512 (tools/llama-bench, llama.cpp 0c1e570): the whole prompt in
        # one batch, and flash attention on its default "auto", which is on for the CPU.
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
    except Exception as e:  # noqa: BLE001 - whatever stops the load is the answer
        answer({"error": f"{type(e).__name__}: {e}"})
        return
    answer({"ready": True, "n_vocab": llm.n_vocab()})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            # reset() empties the context: for a hybrid model it clears the KV cache and the
            # recurrent states (llama_memory_clear), so every request starts from nothing.
            llm.reset()
            if req["op"] == "prefill":
                t0 = time.perf_counter()
                llm.eval(req["tokens"])
                answer({"s": time.perf_counter() - t0})
            elif req["op"] == "decode":
                llm.eval(req["tokens"])
                steps = []
                for tok in req["steps"]:
                    t0 = time.perf_counter()
                    llm.eval([tok])
                    steps.append(time.perf_counter() - t0)
                answer({"s": steps})
            else:
                answer({"error": f"unknown op {req['op']!r}"})
        except Exception as e:  # noqa: BLE001 - a bad request must not end the peer
            answer({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
