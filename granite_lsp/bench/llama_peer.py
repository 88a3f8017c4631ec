"""llama.cpp timed on request, in a child process of the bench (see llama_baseline.py).

This file imports nothing from granite_lsp: it runs under another interpreter, one that has
llama-cpp-python. Protocol: one JSON object a line on stdin, one answer a line on stdout. First
it answers ``{"ready": true, "n_vocab": V, "extra_bufts": bool, "buffers": {name: MiB}}`` (or
``{"error": ...}`` if the model does not load), then to ``{"op": "prefill", "tokens": [...]}``
with ``{"s": seconds}`` (from an empty context), and to ``{"op": "decode", "tokens": [...],
"steps": [...]}`` with ``{"s": [seconds per step], "sums": [the sum of the logits after each
step]}`` (the tokens evaluated untimed first, then each step token alone, as a decode step). With
``"fill": "one_token"`` the decode request's context is evaluated one token at a time, for a
configuration whose multi-token batches crash llama.cpp but whose one-token steps run (its AMX
Q8_0 path: see llama_baseline.start_paths); that costs one step per token (~10 s for 512), so the
context is kept (llama.cpp's state, copied out once) and a later request on the same tokens starts
from a copy of it, as the bench's own side restores a snapshot per round. A request that fails is
answered with ``{"error": ...}`` and the next one is served.

``--no-extra-bufts`` loads the weights without llama.cpp's extra buffer types (the CPU backend's
repacked layouts: AMX on Intel CPUs that have it, CPU_REPACK elsewhere), as llama-bench's
``--no-repack``/``-nr`` does; ``buffers`` says where the weights went (llama.cpp's own "model
buffer size" lines, e.g. ``{"AMX": 302.8, "CPU_Mapped": 345.8}``). ``--probe N`` evaluates N tokens
and one decode step before answering ready: a configuration that crashes llama.cpp (its process
dies) then does so before the bench counts on it (``--probe 1``: one-token steps only).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

# "load_tensors:          AMX model buffer size =   302.81 MiB"
_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([0-9.]+) MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", help="the model file (llama.cpp's GGUF)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048, help="context size: at least the longest request")
    ap.add_argument("--no-extra-bufts", action="store_true", help="no repacked weights (AMX, CPU_REPACK)")
    ap.add_argument("--probe", type=int, default=0, metavar="N", help="evaluate N tokens and a step before ready")
    args = ap.parse_args()

    def answer(out: dict[str, object]) -> None:
        print(json.dumps(out), flush=True)

    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError as e:
        answer({"error": f"{sys.executable} cannot import llama_cpp (pip install llama-cpp-python there): {e}"})
        return
    buffers: dict[str, float] = {}
    _log_callback = _capture_log(llama_cpp, buffers)  # referenced to the end: llama.cpp calls it from C
    try:
        # As llama-bench runs pp512 (tools/llama-bench, llama.cpp 0c1e570): the whole prompt in
        # one batch, and flash attention on its default "auto", which is on for the CPU.
        with _model_params(llama_cpp, use_extra_bufts=not args.no_extra_bufts):
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
        if args.probe:
            n_vocab = llm.n_vocab()
            llm.eval([1 + i % (n_vocab - 1) for i in range(min(args.probe, args.ctx - 1))])
            llm.eval([1])
            llm.reset()
    except Exception as e:  # noqa: BLE001 - whatever stops the load is the answer
        answer({"error": f"{type(e).__name__}: {e}"})
        return
    answer({"ready": True, "n_vocab": llm.n_vocab(), "extra_bufts": not args.no_extra_bufts, "buffers": buffers})
    filled: _Filled | None = None  # the last context fed one token at a time, kept
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
                if req.get("fill", "batch") == "one_token":
                    filled = _fill_one_token_at_a_time(llama_cpp, llm, req["tokens"], filled)
                else:
                    llm.eval(req["tokens"])
                steps: list[float] = []
                sums: list[float] = []
                for tok in req["steps"]:
                    t0 = time.perf_counter()
                    llm.eval([tok])
                    steps.append(time.perf_counter() - t0)
                    sums.append(_logit_sum(llama_cpp, llm))  # untimed
                answer({"s": steps, "sums": sums})
            else:
                answer({"error": f"unknown op {req['op']!r}"})
        except Exception as e:  # noqa: BLE001 - a bad request must not end the peer
            answer({"error": f"{type(e).__name__}: {e}"})
    # Freed here, while the log callback lives: at interpreter exit llama.cpp would log its
    # teardown through a callback Python may have collected already.
    llm.close()


class _Filled:
    """A context fed one token at a time: its tokens and llama.cpp's state after them (the KV cache,
    the recurrent states and the last logits, as ``llama_state_get_data`` writes them)."""

    def __init__(self, llama_cpp: Any, llm: Any, tokens: list[int]) -> None:
        size = llama_cpp.llama_state_get_size(llm._ctx.ctx)
        self.data = (ctypes.c_uint8 * size)()
        self.size = llama_cpp.llama_state_get_data(llm._ctx.ctx, self.data, size)
        self.tokens = list(tokens)


def _fill_one_token_at_a_time(llama_cpp: Any, llm: Any, tokens: list[int], kept: _Filled | None) -> _Filled | None:
    """``tokens`` in the (just emptied) context of ``llm``, each evaluated alone: from ``kept``'s
    copy when it holds the same tokens, else step by step (then kept). Returns what is kept (an
    empty context, as at depth 0, needs nothing and leaves the kept one in place)."""
    if not tokens:
        return kept
    if kept is None or kept.tokens != tokens:
        for tok in tokens:
            llm.eval([tok])
        return _Filled(llama_cpp, llm, tokens)
    if llama_cpp.llama_state_set_data(llm._ctx.ctx, kept.data, kept.size) != kept.size:
        raise RuntimeError("llama.cpp did not take back the state of the context it was fed")
    # the high-level object's own count: the next eval goes on at this position
    llm.input_ids[: len(tokens)] = tokens
    llm.n_tokens = len(tokens)
    return kept


def _logit_sum(llama_cpp: Any, llm: Any) -> float:
    """The sum of the logits after the last evaluation, a fingerprint of the state it ran on: the
    same kernels on the same state give the same bits, so two ways of reaching one context (a
    fill, its kept copy) can be told apart from a state that differs."""
    logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return float(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).astype(np.float64).sum())


@contextmanager
def _model_params(llama_cpp: Any, use_extra_bufts: bool) -> Iterator[None]:
    """``Llama(...)`` with ``llama_model_params.use_extra_bufts`` set. The high-level ``Llama``
    has no argument for it: its ``__init__`` fills its model params from
    ``llama_cpp.llama_cpp.llama_model_default_params()`` and loads the model in the same call, so
    that function answers with the field set while the model loads."""
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params
    if use_extra_bufts:  # llama.cpp's default: nothing to change
        yield
        return
    if not any(name == "use_extra_bufts" for name, *_ in lib.llama_model_params._fields_):
        raise RuntimeError(f"llama-cpp-python {llama_cpp.__version__} cannot turn llama.cpp's extra buffer types off")

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def _capture_log(llama_cpp: Any, buffers: dict[str, float]) -> Any:
    """Route llama.cpp's log through a callback that records its "model buffer size" lines in
    ``buffers`` and passes errors on to stderr (``verbose=False`` would drop them: they explain a
    load that fails)."""

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", "replace")
        m = _BUFFER_LINE.search(line)
        if m:
            buffers[m.group(1)] = buffers.get(m.group(1), 0.0) + float(m.group(2))
        if level == 3:  # GGML_LOG_LEVEL_ERROR
            print(line, end="", file=sys.stderr, flush=True)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


if __name__ == "__main__":
    main()
