"""``granite-lsp bench``: the benchmarks, kept apart from the product (nothing that serves imports them).

- ``trace``: replay an editing trace through the real server over stdio (``granite-lsp bench [TRACE]``);
  ``replay`` runs one mode's server, ``trace_report`` summarizes and prints.
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
    if ("-h" in argv or "--help" in argv) and "--kernels" not in argv and "--engine" not in argv:
        # One help for every mode: the trace replay's options, then those --kernels and --engine take.
        from . import microbench
        from .remote import main as remote_main
        from .trace import main as trace_main

        for title, mode_main in (
            ("", trace_main),
            ("with --kernels (runtime speed per precision), these options instead:", microbench.main),
            ("with --engine remote (a trace through a shared remote engine), these options instead:", remote_main),
        ):
            if title:
                print(f"\n{title}\n")
            try:
                mode_main(["--help"])
            except SystemExit:
                pass
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
