"""LSP wiring: documents in, inline completions out; short handlers that delegate.

Requests are served by ``completions``, every piece of model work is scheduled by ``scheduler``, settings
come from ``settings``' schema, document sync and the answering rules live in ``protocol``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import asdict
from typing import Any

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from . import __version__, completions, parent_watch
from .ahead import FOCUS, WorkAhead
from .completions import ACCEPTED
from .context import ContextRing, workspace_roots
from .documents import UTF16, DocumentStore
from .memory import LEDGER
from .protocol import STATS, STREAMING_CAPABILITY, GraniteProtocol
from .remote_engine import RemoteEngine
from .scheduler import Job, Scheduler
from .service import CompletionService, load
from .settings import Settings

log = logging.getLogger(__name__)

STATUS = "granite/status"


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
        self._scheduler: Scheduler | None = None
        self._loads = 0  # model loads begun: a load's remote check gives up once a newer one is asked for
        self.counters = {"requests": 0, "answered_null": 0, "answered_items": 0, "errors": 0}
        self.last_stats: dict[str, Any] = {}
        self._client_info: types.ClientInfo | None = None
        self.ahead = WorkAhead(self)  # work ahead of the next request (issue 15)

    # ---- plumbing ------------------------------------------------------------------------------------

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = Scheduler(asyncio.get_running_loop())
        return self._scheduler

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
        if doc is not None and not doc.out_of_sync:
            start, end = ContextRing.region(line)
            starts = doc.line_starts
            a = starts[min(start, len(starts) - 1)]
            b = starts[end] if end < len(starts) else len(doc.text)
            self.context.note(uri, start, doc.text[a:b])
        self.scheduler.document_changed(uri)
        self.ahead.changed(uri, line)

    def document_out_of_sync(self, uri: str, reason: str) -> None:
        """A change of ``uri`` could not be applied: our copy may differ from the editor's. Nothing is
        completed from it (text would land in the wrong place) until the editor sends its whole text
        again (didOpen, or a change without a range); the user is told once, with the way out."""
        doc = self.documents.get(uri)
        if doc is None or doc.out_of_sync:
            return
        doc.out_of_sync = reason
        self.counters["out_of_sync"] = self.counters.get("out_of_sync", 0) + 1
        self.context.forget(uri)
        self.scheduler.document_changed(uri)  # what runs for it was asked for a text that may be wrong
        message = (
            f"granite-lsp: lost track of {uri} ({reason}): no suggestions there until the editor sends "
            "the whole file again; close and reopen it"
        )
        log.warning(message)
        self.window_show_message(types.ShowMessageParams(type=types.MessageType.Warning, message=message))

    def on_document_closed(self, uri: str) -> None:
        self.context.forget(uri)
        self.scheduler.document_closed(uri)
        self.ahead.closed(uri)
        service = self.service
        if service is not None:
            self.scheduler.submit(lambda job: service.forget(uri))

    def notify_status(self, state: str, message: str = "") -> None:
        loaded = self.service.loaded if self.service else None
        settings = self.settings
        status = {
            "state": state,
            "model": settings.model,
            "device": loaded.device if loaded else settings.device,
            "dtype": str(loaded.dtype).removeprefix("torch.") if loaded and loaded.dtype else settings.dtype,
            "message": message,
            "engine": settings.engine,
        }
        if settings.engine == "remote":
            status.update(endpoint=settings.endpoint, remoteModel=settings.remote_model)
        self.protocol.notify(STATUS, status)

    # ---- model loading -------------------------------------------------------------------------------

    async def load_model(self) -> None:
        """Load (or reload) the model on the worker thread, reporting progress to the client."""
        self.loading = True
        self.load_error = None
        self._loads += 1
        ticket = self._loads
        settings = self.settings
        progress = await _LoadProgress.begin(self)
        self.notify_status("loading", f"Loading {settings.model}")
        loop = asyncio.get_running_loop()

        def engine_status(state: str, message: str) -> None:  # a remote engine's health, from the worker
            loop.call_soon_threadsafe(self.notify_status, state, message)

        def do_load(job: Job) -> CompletionService:
            service = CompletionService(load(settings, progress.report), settings, engine_status)
            if isinstance(service.engine, RemoteEngine):  # given up when a newer load waits behind it
                service.engine.probe(cancelled=lambda: self._loads != ticket or self.exiting)
            return service

        # Drop the previous model first: holding two while the new one loads can itself run out of memory.
        self.service = None
        try:
            service = await self.scheduler.submit(do_load).future
            if self._loads != ticket:
                return  # a newer load was asked for meanwhile: its model is the one to serve with
            self.service = service
            state, message = _ready_status(service, settings)
            log.info(message)
            self.notify_status(state, message)
        except Exception as e:
            if self._loads != ticket:
                return
            self.service = None
            reason = self.load_error = _load_failure(e, settings)
            log.error("model failed to load: %s", reason)
            self.window_show_message(
                types.ShowMessageParams(type=types.MessageType.Error, message=f"granite-lsp: {reason}")
            )
            self.notify_status("error", reason)
        finally:
            superseded = self._loads != ticket
            self.loading = superseded  # still loading when a newer load is under way
            progress.end("Replaced by a newer load" if superseded else "Ready" if self.service else "Failed")

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
        return reload

    def client_draws_ranges_as_overlay(self) -> bool:
        """VS Code needs an explicit range (it otherwise replaces from the word start to the line end);
        Neovim 0.12 renders every ranged item as an overlay hiding the text after the cursor."""
        name = (self._client_info.name if self._client_info else "").lower()
        return name in ("neovim", "nvim")

    def stats(self) -> dict[str, Any]:
        service = self.service
        out: dict[str, Any] = {"counters": dict(self.counters), "last": dict(self.last_stats)}
        protocol = self.protocol
        out["protocol"] = dict(protocol.counters) if isinstance(protocol, GraniteProtocol) else {}
        if self._scheduler is not None:
            out["worker"] = {**asdict(self._scheduler.stats), "busy": self._scheduler.busy}
            out["waits"] = self._scheduler.waits.as_dict()  # requests' waits for the model thread
        if service is not None:
            out["decoded_tokens"] = service.decoded_tokens
            if service.cache is not None:
                cap = {"max_bytes": service.cache.max_bytes} if hasattr(service.cache, "max_bytes") else {}
                out["cache"] = {**asdict(service.cache.stats), "bytes": service.cache.nbytes(), **cap}
            model = service.loaded.model
            out["model_bytes"] = model.weight_bytes() if model is not None else 0
            if isinstance(service.engine, RemoteEngine):
                out["remote"] = {**asdict(service.engine.stats), "down": service.engine.health.down}
            out["typed_through"] = service.typed_through
        out["background"] = self.ahead.stats.as_dict()
        out["memory"] = LEDGER.as_dict()  # resident memory by stage, the load's peak, the serving peak
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
        parent_watch.watch(params.process_id)

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
    async def on_inline_completion(
        ls: GraniteServer, params: types.InlineCompletionParams
    ) -> types.InlineCompletionList | None:
        ls.counters["requests"] += 1
        ls.ahead.requested(params.text_document.uri, params.position.line, params.position.character)
        result = await completions.inline_completion(ls, params)
        ls.ahead.answered(params.text_document.uri)
        ls.counters["answered_items" if result else "answered_null"] += 1
        return result

    @server.command(ACCEPTED)
    def on_accepted(ls: GraniteServer, *args: Any) -> None:
        completions.prefetch_after_accept(ls, args[0] if args and isinstance(args[0], dict) else {})

    @server.feature(FOCUS)
    def on_focus(ls: GraniteServer, params: Any) -> None:
        ls.ahead.focus(params)

    @server.feature(STATS)
    def on_stats(ls: GraniteServer, params: Any) -> dict[str, Any]:
        return ls.stats()

    return server


class _LoadProgress:
    """The editor's progress bar for one model load ($/progress), where the client supports it."""

    def __init__(self, server: GraniteServer, token: str | None) -> None:
        self._server, self._token = server, token
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def begin(cls, server: GraniteServer) -> _LoadProgress:
        caps = server.client_capabilities
        if not (caps and caps.window and caps.window.work_done_progress):
            return cls(server, None)
        token = str(uuid.uuid4())
        try:
            await asyncio.wait_for(server.work_done_progress.create_async(token), timeout=5)
            server.work_done_progress.begin(
                token, types.WorkDoneProgressBegin(title="Granite", message="Loading model")
            )
        except Exception:
            return cls(server, None)
        return cls(server, token)

    def report(self, message: str, percent: int) -> None:
        """Called from the model thread (load's progress callback)."""
        if self._token is not None:
            value = types.WorkDoneProgressReport(message=message, percentage=percent)
            self._loop.call_soon_threadsafe(self._server.work_done_progress.report, self._token, value)

    def end(self, message: str) -> None:
        if self._token is not None:
            self._server.work_done_progress.end(self._token, types.WorkDoneProgressEnd(message=message))


def _ready_status(service: CompletionService, settings: Settings) -> tuple[str, str]:
    """granite/status after a load: what was loaded, or why a remote engine is not answering yet."""
    engine = service.engine
    if isinstance(engine, RemoteEngine):
        message = f"{settings.remote_model} on {engine.endpoint} (tokenizer of {settings.model})"
        if engine.health.down:
            return "error", engine.stats.last_error or message
        return "ready", message
    loaded = service.loaded
    return "ready", f"{settings.model} on {loaded.device} loaded in {loaded.load_seconds:.1f} s"


def _load_failure(error: Exception, settings: Settings) -> str:
    """What the user reads when the model failed to load; running out of memory says what to try."""
    reason = str(error)
    if isinstance(error, MemoryError) or "can't allocate memory" in reason or "out of memory" in reason.lower():
        reason = (
            f"not enough memory to load {settings.model} ({settings.dtype}, quantize {settings.quantize}): "
            f"{reason or type(error).__name__}. Try dtype bfloat16 or quantize int8, or free memory; "
            "changing the configuration retries."
        )
    return reason
