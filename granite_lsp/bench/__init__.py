"""``granite-lsp bench``: the benchmarks, kept apart from the product (nothing that serves imports them).

- ``trace``: replay an editing trace through the real server over stdio (``granite-lsp bench [TRACE]``).
- ``microbench``: runtime speed per precision on the real shape (``granite-lsp bench --kernels``).
- ``matmuls``: one decode token's matmuls, torch vs our kernels (``python -m granite_lsp.bench.matmuls``).
- ``llama_baseline`` / ``llama_peer``: llama.cpp timed in the same rounds (``--kernels --llama-cpp DIR``).
- ``reference``: transformers' model as a generation backend, the trace replay's baseline.
- ``remote``: a trace through a shared remote engine, N simulated editors (``granite-lsp bench --engine remote``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if ("-h" in argv or "--help" in argv) and "--kernels" not in argv:
        # One help for both modes: the trace replay's options, then those --kernels takes.
        from . import microbench
        from .trace import main as trace_main

        try:
            trace_main(["--help"])
        except SystemExit:
            pass
        print("\nwith --kernels (runtime speed per precision), these options instead:\n")
        microbench.main(["--help"])
        return 0
    if "--kernels" in argv:
        # Runtime speed per precision (decode / prefill tokens/s, matmuls alone, server RSS).
        from . import microbench

        microbench.main([a for a in argv if a != "--kernels"])
        return 0
    if any(a == "--engine" or a.startswith("--engine=") for a in argv):
        from .remote import main as remote_main

        return remote_main(argv)
    from .trace import main as trace_main

    return trace_main(argv)
