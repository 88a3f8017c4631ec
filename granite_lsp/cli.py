"""Command line: the language server (default), ``complete`` (headless, scriptable), ``download``, ``doctor``
and ``bench``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .framing import DEFAULT_MAX_BODY
from .model_files import DEFAULT_MODEL, ModelNotFound, UnsafeCheckpoint
from .settings import SettingsError, add_cli_options, from_cli

SUBCOMMANDS = """subcommands (granite-lsp SUBCOMMAND --help for each):
  complete FILE --line L --character C   print the completion at a cursor (headless, scriptable)
  download [ID]                          download a model into the Hugging Face cache (resumable)
  doctor                                 what granite-lsp finds here: Python, torch, device, kernels, model
  bench [TRACE]                          benchmarks (editing-trace replay; --kernels: runtime speed)
without a subcommand granite-lsp is the language server (--stdio or --tcp)."""


def _setup_logging(log_file: str | None, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pygls logs every message body (document text) at INFO: only with --debug.
    logging.getLogger("pygls").setLevel(logging.DEBUG if debug else logging.WARNING)


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="granite-lsp",
        description="Granite FIM completions over LSP",
        epilog=SUBCOMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stdio", action="store_true", help="speak LSP over stdin/stdout (default)")
    mode.add_argument("--tcp", action="store_true", help="listen for one LSP client over TCP")
    p.add_argument("--host", default=None, help="TCP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=2087)
    p.add_argument(
        "--max-message-mb",
        type=float,
        default=DEFAULT_MAX_BODY / (1 << 20),
        help="largest LSP message accepted, in MiB (larger ones are refused; default %(default)g)",
    )
    add_cli_options(p)
    p.add_argument("--log-file", default=None)
    p.add_argument("--debug", action="store_true", help="verbose logs, including message bodies")
    p.add_argument("--version", action="version", version=f"granite-lsp {__version__}")
    args = p.parse_args(argv)
    _setup_logging(args.log_file, args.debug)
    try:
        settings = from_cli(args)
    except SettingsError as e:
        p.error(str(e))
    if not 0 < args.max_message_mb <= 4096:
        p.error(f"--max-message-mb must be between 0 and 4096, got {args.max_message_mb:g}")
    from .memory import LEDGER

    LEDGER.mark("started")
    from .protocol import GraniteProtocol
    from .server import build_server
    from .transport import PortInUse, serve_stdio, serve_tcp

    LEDGER.mark("imported")  # the interpreter, torch and the server's modules: no model yet

    server = build_server(settings)
    protocol = server.protocol
    assert isinstance(protocol, GraniteProtocol)
    protocol.show_tracebacks = args.debug
    max_body = int(args.max_message_mb * (1 << 20))
    signal.signal(signal.SIGINT, _exit_on_interrupt)
    try:
        if args.tcp:
            host = args.host or "127.0.0.1"
            if args.host and args.host not in ("127.0.0.1", "localhost", "::1"):
                logging.getLogger(__name__).warning(
                    "listening on %s: anyone who can reach this address can read your code through the server",
                    host,
                )
            code = serve_tcp(protocol, host, args.port, max_body)
        else:
            code = serve_stdio(protocol, max_body)
    except PortInUse as e:
        print(f"granite-lsp: {e.strerror}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        logging.getLogger(__name__).info("interrupted: exiting")
        code = 130
    # stdin closed, exit received or interrupted: do not wait for the model thread to finish a generation.
    logging.shutdown()
    os._exit(code)


def _exit_on_interrupt(signum: int, frame: object) -> None:
    """Ctrl-C ends the server at once with 130, from the signal handler itself. As a KeyboardInterrupt it
    had to travel out of whatever the main thread was running, and a CI run saw the server outlive
    SIGINT during a generation by 30 s (not reproduced alone; the cause was not found)."""
    os.write(2, b"granite-lsp: interrupted: exiting\n")
    os._exit(130)


def complete_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="granite-lsp complete", description="Print the completion at a cursor")
    p.add_argument("file", type=Path)
    p.add_argument("--line", type=int, required=True, help="0-based line (as LSP)")
    p.add_argument("--character", type=int, required=True, help="0-based UTF-16 column (as LSP)")
    p.add_argument("--raw", action="store_true", help="print the model's middle without post-processing")
    add_cli_options(p, ("max_tokens",))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from .documents import Document, PositionError
    from .remote_engine import RemoteEngine
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
        settings = from_cli(args)
        service = CompletionService(load(settings), settings)
    except (ModelNotFound, UnsafeCheckpoint, SettingsError, ValueError) as e:  # ValueError: a remote without endpoint
        print(f"granite-lsp: {e}", file=sys.stderr)
        return 2
    from .context import ContextRing

    # As the editor would send it: the file's path relative to the working directory (the workspace).
    header = ContextRing(roots=(Path.cwd().as_posix(),)).ids(
        doc.uri, service.loaded.tokenizer, 0, settings.filename_in_prompt
    )
    result = service.complete(doc.uri, text, cursor, shape=not args.raw, context_ids=header)
    if isinstance(service.engine, RemoteEngine) and result.generation.stop_reason == "unavailable":
        print(f"granite-lsp: {service.engine.stats.last_error}", file=sys.stderr)
        return 1
    if result.suggestion is not None:
        sys.stdout.write(result.suggestion.text)
        sys.stdout.flush()
    return 0


def download_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="granite-lsp download",
        description="Download a model's safetensors, config and tokenizer into the Hugging Face cache "
        "(HF_HOME / HF_HUB_CACHE choose where, HF_ENDPOINT another hub); a dropped connection resumes. "
        "Prints the directory it went to.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"Hugging Face id (default {DEFAULT_MODEL})")
    args = p.parse_args(argv)
    from .model_files import download_model

    print(f"granite-lsp: downloading {args.model} ...", file=sys.stderr)
    try:
        path = download_model(args.model)
    except (ModelNotFound, UnsafeCheckpoint) as e:
        print(f"granite-lsp: {e}", file=sys.stderr)
        return 2
    print(f"granite-lsp: {args.model} is in {path}", file=sys.stderr)
    print(path)
    return 0


def doctor_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="granite-lsp doctor",
        description="Print what granite-lsp finds on this machine, with the settings given here: Python, torch, "
        "device, CPU kernels (building them if needed), compiler, model lookup, cache paths, settings. "
        "Exit code 1 when something stops completions (no model, an unusable device).",
    )
    add_cli_options(p)
    args = p.parse_args(argv)
    try:
        settings = from_cli(args)
    except SettingsError as e:
        p.error(str(e))
    from .doctor import report

    ok = True
    for line, good in report(settings):
        print(line, flush=True)
        ok = ok and good
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "complete":
        return complete_main(argv[1:])
    if argv and argv[0] == "download":
        return download_main(argv[1:])
    if argv and argv[0] == "doctor":
        return doctor_main(argv[1:])
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
