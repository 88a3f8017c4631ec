"""LSP wiring: documents in, inline completions out. All model work goes through the ModelWorker."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import asdict
from typing import Any

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from . import __version__
from .context import ContextRing, workspace_roots
from .documents import UTF16, DocumentStore, PositionError
from .postprocess import Suggestion
from .protocol import STATS, STREAMING_CAPABILITY, GraniteProtocol
from .scheduler import Job, ModelWorker
from .service import CompletionService, load
from .settings import Settings

log = logging.getLogger(__name__)

STATUS = "granite/status"
PARTIAL = "granite/partialCompletion"
ACCEPTED = "granite.accepted"


class GraniteServer(LanguageServer):
    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__("granite-lsp", __version__, protocol_cls=GraniteProtocol)
        self.documents = DocumentStore()
        self.context = ContextRing()
        self.settings = settings or Settings()
        self.service: CompletionService | None = None
        self.load_error: str | None = None
        self.loading = False
        self.initialized = False
        self.exiting = False
        self._worker: ModelWorker | None = None
        self._last_change: dict[str, float] = {}
        self._typing_interval: dict[str, float] = {}
        self.counters = {"requests": 0, "answered_null": 0, "answered_items": 0, "errors": 0}
        self.last_stats: dict[str, Any] = {}
        self._client_info: types.ClientInfo | None = None

    # ---- plumbing ------------------------------------------------------------------------------------

    @property
    def worker(self) -> ModelWorker:
        if self._worker is None:
            self._worker = ModelWorker(asyncio.get_running_loop())
        return self._worker

    @property
    def position_encoding(self) -> str:
        try:
            enc = self.protocol.workspace.position_encoding
        except RuntimeError:
            return UTF16
        return str(getattr(enc, "value", enc) or UTF16)

    def client_speaks_partials(self) -> bool:
        """One of our own clients: it opted into granite/partialCompletion in its capabilities."""
        caps = self.client_capabilities
        experimental = getattr(caps, "experimental", None) if caps else None
        return isinstance(experimental, dict) and bool(experimental.get(STREAMING_CAPABILITY))

    def client_streams(self) -> bool:
        return self.client_speaks_partials() and self.settings.streaming

    def on_document_changed(self, uri: str, line: int) -> None:
        doc = self.documents.get(uri)
        if doc is not None:
            start, end = ContextRing.region(line)
            starts = doc.line_starts
            a = starts[min(start, len(starts) - 1)]
            b = starts[end] if end < len(starts) else len(doc.text)
            self.context.note(uri, start, doc.text[a:b])
        now = time.monotonic()
        last = self._last_change.get(uri)
        if last is not None and now - last < 1.0:
            prev = self._typing_interval.get(uri, now - last)
            self._typing_interval[uri] = 0.7 * prev + 0.3 * (now - last)
        else:
            self._typing_interval.pop(uri, None)
        self._last_change[uri] = now
        if self._worker is not None:
            self._worker.supersede(uri)

    def on_document_closed(self, uri: str) -> None:
        self.context.forget(uri)
        self._last_change.pop(uri, None)
        self._typing_interval.pop(uri, None)
        if self._worker is not None:
            self._worker.supersede(uri)
            service = self.service
            if service is not None:
                self._worker.submit(None, lambda job: service.forget(uri))

    def debounce_seconds(self, uri: str) -> float:
        """How long an automatic request waits before it may start model work.

        Long enough that, while the user types in a burst, the next keystroke arrives first (so the
        request is superseded before the model starts); short when the user types slowly. Before any
        typing rhythm is known (the first keystroke), the configured base value.
        """
        base = self.settings.debounce_ms / 1000.0
        if base <= 0:
            return 0.0
        interval = self._typing_interval.get(uri)
        if interval is None:
            return base
        return min(2 * base, max(0.02, 1.2 * interval))

    def notify_status(self, state: str, message: str = "") -> None:
        loaded = self.service.loaded if self.service else None
        self.protocol.notify(
            STATUS,
            {
                "state": state,
                "model": self.settings.model,
                "device": loaded.device if loaded else self.settings.device,
                "dtype": str(loaded.dtype).removeprefix("torch.") if loaded else self.settings.dtype,
                "message": message,
            },
        )

    # ---- model loading -------------------------------------------------------------------------------

    async def load_model(self) -> None:
        """Load (or reload) the model on the worker thread, reporting progress to the client."""
        self.loading = True
        self.load_error = None
        settings = self.settings
        token = str(uuid.uuid4())
        progress = self.work_done_progress
        use_progress = bool(
            self.client_capabilities
            and self.client_capabilities.window
            and self.client_capabilities.window.work_done_progress
        )
        if use_progress:
            try:
                await asyncio.wait_for(progress.create_async(token), timeout=5)
                progress.begin(token, types.WorkDoneProgressBegin(title="Granite", message="Loading model"))
            except Exception:
                use_progress = False
        self.notify_status("loading", f"Loading {settings.model}")
        loop = asyncio.get_running_loop()

        def report(message: str, percent: int) -> None:
            if use_progress:
                value = types.WorkDoneProgressReport(message=message, percentage=percent)
                loop.call_soon_threadsafe(progress.report, token, value)

        def do_load(job: Job) -> CompletionService:
            return CompletionService(load(settings, report), settings)

        # Drop the previous model first: holding two while the new one loads can itself run out of memory.
        self.service = None
        try:
            self.service = await self.worker.submit(None, do_load).future
            loaded = self.service.loaded
            message = f"{settings.model} on {loaded.device} loaded in {loaded.load_seconds:.1f} s"
            log.info(message)
            self.notify_status("ready", message)
        except Exception as e:
            self.service = None
            reason = str(e)
            if isinstance(e, MemoryError) or "can't allocate memory" in reason or "out of memory" in reason.lower():
                reason = (
                    f"not enough memory to load {settings.model} ({settings.dtype}, quantize {settings.quantize}): "
                    f"{reason or type(e).__name__}. Try dtype bfloat16 or quantize int8, or free memory; "
                    "changing the configuration retries."
                )
            self.load_error = reason
            log.error("model failed to load: %s", reason)
            self.window_show_message(
                types.ShowMessageParams(type=types.MessageType.Error, message=f"granite-lsp: {reason}")
            )
            self.notify_status("error", reason)
        finally:
            self.loading = False
            if use_progress:
                progress.end(token, types.WorkDoneProgressEnd(message="Ready" if self.service else "Failed"))

    def apply_settings(self, options: Any) -> bool:
        """Apply client options; True when the model must be (re)loaded.

        Keys that are not settings and refused values are reported (a warning and the log) and change
        nothing; the valid ones still apply.
        """
        new, problems = self.settings.merged(options)
        if problems:
            message = "granite-lsp: ignored settings: " + "; ".join(problems)
            log.warning(message)
            self.window_show_message(types.ShowMessageParams(type=types.MessageType.Warning, message=message))
        reload = new.model_key() != self.settings.model_key() or (self.service is None and not self.loading)
        self.settings = new
        if self.service is not None and not reload:
            service = self.service
            self.worker.submit(None, lambda job: service.configure(new))
        return reload

    # ---- completion ----------------------------------------------------------------------------------

    async def inline_completion(self, params: types.InlineCompletionParams) -> types.InlineCompletionList | None:
        self.counters["requests"] += 1
        result = await self._inline_completion(params)
        self.counters["answered_items" if result else "answered_null"] += 1
        return result

    async def _inline_completion(self, params: types.InlineCompletionParams) -> types.InlineCompletionList | None:
        uri = params.text_document.uri
        doc = self.documents.get(uri)
        service = self.service
        if doc is None or service is None:
            return None
        encoding = self.position_encoding
        try:
            cursor = doc.offset_at(params.position.line, params.position.character, encoding, strict=True)
        except PositionError as e:
            log.warning("inline completion at an invalid position: %s", e)
            return None
        automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
        version = doc.version
        text = doc.text
        worker = self.worker
        stream = self.client_streams()
        request_id = str(self.protocol.msg_id) if hasattr(self.protocol, "msg_id") else ""
        loop = asyncio.get_running_loop()
        position = {"line": params.position.line, "character": params.position.character}

        def send_partial(so_far: str, done: bool = False) -> None:
            payload = {"uri": uri, "version": version, "position": position, "requestId": request_id}
            loop.call_soon_threadsafe(self.protocol.notify, PARTIAL, {**payload, "text": so_far, "done": done})

        context_ids = self.context.ids(
            uri, service.loaded.tokenizer, self.settings.context_tokens, self.settings.filename_in_prompt
        )
        # Standard clients get the first complete line as soon as it exists; the rest keeps generating
        # and is served from the typing-through memory when the user accepts that line. Our own clients
        # get the whole suggestion (growing through partial notifications when streaming is on).
        early: asyncio.Future = loop.create_future()
        early_ok = not self.client_speaks_partials() and self.settings.early_first_line and not self.settings.raw

        def on_text(shown: str) -> None:
            if stream:
                send_partial(shown)
            elif early_ok and not early.done():
                lines = shown.split("\n")
                done_lines = lines[:-1]
                first = next((i for i, ln in enumerate(done_lines) if ln.strip()), None)
                if first is not None:
                    loop.call_soon_threadsafe(_resolve_once, early, "\n".join(done_lines[: first + 1]).rstrip())

        def run(job: Job):
            return service.complete(
                uri, text, cursor, context_ids=context_ids, cancelled=job.cancelled, on_text=on_text
            )

        delay = self.debounce_seconds(uri) if automatic else 0.0
        if delay > 0:
            # Hold a place first: it supersedes older requests now, and a newer one supersedes it.
            placeholder = worker.submit(uri, lambda job: None, enqueue=False)
            await asyncio.sleep(delay)
            if placeholder.cancelled():
                return None
            worker.cancel(placeholder, count=False)
        job = worker.submit(uri, run)
        try:
            await asyncio.wait({job.future, early}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            worker.cancel(job)  # $/cancelRequest: stop between two decode steps
            raise
        if not job.future.done():
            current = self.documents.get(uri)
            if current is None or current.version != version:
                return None
            self.counters["early_first_line"] = self.counters.get("early_first_line", 0) + 1
            return self._item(doc, params.position, cursor, Suggestion(early.result(), 0), uri, encoding)
        try:
            completion = job.future.result()
        except Exception as e:
            self.counters["errors"] += 1
            log.error("completion failed: %s", e)
            return None
        if completion is None:
            return None
        gen = completion.generation
        self.last_stats = {**asdict(gen.stats), "total_ms": gen.stats.total_ms, "stop_reason": gen.stop_reason}
        suggestion = completion.suggestion
        if stream:
            send_partial(suggestion.text if suggestion else "", True)
        current = self.documents.get(uri)
        if suggestion is None or current is None or current.version != version:
            return None
        return self._item(doc, params.position, cursor, suggestion, uri, encoding)

    def _item(self, doc, start: types.Position, cursor: int, suggestion: Suggestion, uri: str, encoding: str):
        end_line, end_char = doc.position_at(cursor + suggestion.replace, encoding)
        rng = types.Range(start=start, end=types.Position(line=end_line, character=end_char))
        if suggestion.replace == 0 and self._client_draws_ranges_as_overlay():
            rng = None  # Neovim draws any ranged item over the rest of the line; an insertion needs none
        item = types.InlineCompletionItem(
            insert_text=suggestion.text,
            range=rng,
            command=types.Command(
                title="Granite: accepted",
                command=ACCEPTED,
                arguments=[{"uri": uri, "line": start.line, "character": start.character, "text": suggestion.text}],
            ),
        )
        return types.InlineCompletionList(items=[item])

    def _client_draws_ranges_as_overlay(self) -> bool:
        """VS Code needs an explicit range (it otherwise replaces from the word start to the line end);
        Neovim 0.12 renders every ranged item as an overlay hiding the text after the cursor."""
        name = (self._client_info.name if self._client_info else "").lower()
        return name in ("neovim", "nvim")

    def prefetch_after_accept(self, info: dict) -> None:
        """After a suggestion is accepted, compute the next one at the position after it.

        It yields to real requests: skipped when one is already queued, superseded by any that
        comes; its result waits in the typing-through memory for the editor's next request.
        """
        uri, service = info.get("uri"), self.service
        doc = self.documents.get(uri) if isinstance(uri, str) else None
        if doc is None or service is None or self.worker.has_pending(uri):
            return
        try:
            start = doc.offset_at(int(info["line"]), int(info["character"]), self.position_encoding, strict=True)
        except (KeyError, TypeError, ValueError):
            return
        cursor = start + len(str(info.get("text", "")))
        if cursor > len(doc.text):
            return
        text = doc.text
        context_ids = self.context.ids(
            uri, service.loaded.tokenizer, self.settings.context_tokens, self.settings.filename_in_prompt
        )
        self.counters["prefetches"] = self.counters.get("prefetches", 0) + 1
        self.worker.submit(
            uri, lambda job: service.complete(uri, text, cursor, context_ids=context_ids, cancelled=job.cancelled)
        )

    def stats(self) -> dict[str, Any]:
        service = self.service
        out: dict[str, Any] = {"counters": dict(self.counters), "last": dict(self.last_stats)}
        if self._worker is not None:
            out["worker"] = {**asdict(self._worker.stats), "busy": self._worker.busy}
        if service is not None:
            out["cache"] = {**asdict(service.cache.stats), "bytes": service.cache.nbytes()}
            out["typed_through"] = service.shown.hits
        out["documents"] = len(self.documents)
        out["model_loaded"] = service is not None
        out["load_error"] = self.load_error
        return out


def build_server(settings: Settings | None = None) -> GraniteServer:
    server = GraniteServer(settings)

    @server.feature(types.INITIALIZE)
    def on_initialize(ls: GraniteServer, params: types.InitializeParams) -> None:
        ls._client_info = params.client_info
        ls.context.set_roots(workspace_roots(params))
        ls.apply_settings(params.initialization_options)
        if params.process_id:
            asyncio.get_running_loop().create_task(_watch_parent(params.process_id))

    @server.feature(types.INITIALIZED)
    async def on_initialized(ls: GraniteServer, params: types.InitializedParams) -> None:
        await ls.load_model()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    async def on_configuration(ls: GraniteServer, params: types.DidChangeConfigurationParams) -> None:
        settings = params.settings
        if isinstance(settings, dict) and isinstance(settings.get("granite"), dict):
            settings = settings["granite"]
        if ls.apply_settings(settings) or (ls.service is None and not ls.loading):
            await ls.load_model()

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions(work_done_progress=False))
    async def on_inline_completion(ls: GraniteServer, params: types.InlineCompletionParams):
        return await ls.inline_completion(params)

    @server.command(ACCEPTED)
    def on_accepted(ls: GraniteServer, *args: Any) -> None:
        ls.prefetch_after_accept(args[0] if args and isinstance(args[0], dict) else {})
        return None

    @server.feature(STATS)
    def on_stats(ls: GraniteServer, params: Any) -> dict[str, Any]:
        return ls.stats()

    return server


async def _watch_parent(pid: int) -> None:
    """Exit when the editor that started us is gone (LSP: initialize's processId)."""
    while True:
        await asyncio.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.warning("client process %s is gone; exiting", pid)
            os._exit(0)
        except PermissionError:
            pass


def _resolve_once(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)
