"""Command line: the language server (default), ``complete`` (headless, scriptable) and ``bench``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .model_files import DEFAULT_MODEL, ModelNotFound, UnsafeCheckpoint
from .settings import Settings, SettingsError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face id or local directory (safetensors)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help="weight-only quantization")
    p.add_argument("--download", action="store_true", help="allow downloading the model from the Hub")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def _settings(args: argparse.Namespace, **extra) -> Settings:
    return Settings().updated(
        {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "quantize": args.quantize,
            "download": args.download,
            **extra,
        }
    )


def _setup_logging(log_file: str | None, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pygls logs every message body (document text) at INFO: only with --debug.
    logging.getLogger("pygls").setLevel(logging.DEBUG if debug else logging.WARNING)


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="granite-lsp", description="Granite FIM completions over LSP")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stdio", action="store_true", help="speak LSP over stdin/stdout (default)")
    mode.add_argument("--tcp", action="store_true", help="listen for one LSP client over TCP")
    p.add_argument("--host", default=None, help="TCP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=2087)
    _model_args(p)
    p.add_argument("--log-file", default=None)
    p.add_argument("--debug", action="store_true", help="verbose logs, including message bodies")
    p.add_argument("--version", action="version", version=f"granite-lsp {__version__}")
    args = p.parse_args(argv)
    _setup_logging(args.log_file, args.debug)
    _set_threads(args.threads)
    try:
        settings = _settings(args)
    except SettingsError as e:
        p.error(str(e))
    from .server import build_server

    server = build_server(settings)
    if args.tcp:
        host = args.host or "127.0.0.1"
        if args.host and args.host not in ("127.0.0.1", "localhost", "::1"):
            logging.getLogger(__name__).warning(
                "listening on %s: anyone who can reach this address can read your code through the server",
                host,
            )
        server.start_tcp(host, args.port)
    else:
        server.start_io()
    # stdin closed or exit received: do not wait for the model thread to finish a generation.
    logging.shutdown()
    os._exit(0)


def complete_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="granite-lsp complete", description="Print the completion at a cursor")
    p.add_argument("file", type=Path)
    p.add_argument("--line", type=int, required=True, help="0-based line (as LSP)")
    p.add_argument("--character", type=int, required=True, help="0-based UTF-16 column (as LSP)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="print the model's middle without post-processing")
    _model_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _set_threads(args.threads)
    from .documents import Document, PositionError
    from .service import CompletionService, load

    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"granite-lsp: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    doc = Document(uri=args.file.resolve().as_uri(), text=text)
    try:
        cursor = doc.offset_at(args.line, args.character, strict=True)
    except PositionError as e:
        print(f"granite-lsp: {e}", file=sys.stderr)
        return 2
    try:
        settings = _settings(args, max_tokens=args.max_tokens)
        service = CompletionService(load(settings), settings)
    except (ModelNotFound, UnsafeCheckpoint, SettingsError) as e:
        print(f"granite-lsp: {e}", file=sys.stderr)
        return 2
    result = service.complete(doc.uri, text, cursor, shape=not args.raw)
    if result.suggestion is not None:
        sys.stdout.write(result.suggestion.text)
        sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "complete":
        return complete_main(argv[1:])
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
