"""pygls' LSP protocol with our document sync and the guarantee that every request is answered once.

Bodies come in from :mod:`granite_lsp.transport` (already framed); everything between the bytes of a body
and a handler is decided here: what is a message at all, what gets which JSON-RPC error, what is
dropped (and logged), in which order the LSP life cycle allows things.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcServerNotInitialized,
)
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

from . import failpoints

if TYPE_CHECKING:
    from .server import GraniteServer

log = logging.getLogger(__name__)

STATS = "granite/stats"
STREAMING_CAPABILITY = "granitePartialCompletion"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603

_UNANSWERABLE = object()  # a request already answered with an error while it was being decoded


def _is_id(value: Any) -> bool:
    """LSP ids are integers or strings (JSON-RPC's null and fractions are not accepted)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _invalid_request(message: Any) -> str | None:
    """Why ``message`` (parsed JSON) is not a JSON-RPC 2.0 message, or None when it is one."""
    if not isinstance(message, dict):
        return "a message must be a JSON object (LSP has no batches)"
    if message.get("jsonrpc") != "2.0":
        return 'the message lacks "jsonrpc": "2.0"'
    if "id" in message and not _is_id(message["id"]):
        return f'"id" must be an integer or a string, got {json.dumps(message["id"])[:40]}'
    if "method" in message:
        if not isinstance(message["method"], str):
            return '"method" must be a string'
        params = message.get("params")
        if params is not None and not isinstance(params, dict | list):
            return '"params" must be an object or an array'
        return None
    if "id" not in message or ("result" not in message and "error" not in message):
        return "neither a request, a notification nor a response"
    return None


class GraniteProtocol(LanguageServerProtocol):
    """pygls' protocol with two changes of substance.

    Document sync goes to our own exact store instead of pygls' workspace copy, and every request gets
    exactly one response: pygls drops requests whose params do not deserialize, and requests that
    arrive before ``initialize`` or after ``shutdown``, without answering them, which leaves an editor
    waiting forever.
    """

    _server: GraniteServer

    show_tracebacks = False  # -32603 answers carry the traceback only when asked for (--debug)

    def __init__(self, server: Any, converter: Any) -> None:
        super().__init__(server, converter)
        self.counters: Counter[str] = Counter()  # what was refused or dropped, for granite/stats and tests
        self.exit_code: int | None = None  # set by the exit notification; the transport then stops
        self._initialized_seen = False

    # ---- bodies in -----------------------------------------------------------------------------------

    def receive_body(self, data: bytes) -> None:
        """One framed body: decode it, check it is a JSON-RPC message, hand it on or answer why not.

        Only the top-level object is a message: pygls parsed with ``structure_message`` as the JSON
        object hook, which ran it on every nested object, so an object inside params that looked like a
        request was answered (with an id the client never sent).
        """
        self.counters["bodies"] += 1
        try:
            text, bad_utf8 = data.decode("utf-8"), False
        except UnicodeDecodeError:
            text, bad_utf8 = data.decode("utf-8", "replace"), True
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as e:
            self.reject(None, PARSE_ERROR, f"parse error: the body is not valid JSON ({str(e)[:200]})")
            return
        msg_id = message.get("id") if isinstance(message, dict) and _is_id(message.get("id")) else None
        if bad_utf8:
            self.reject(msg_id, PARSE_ERROR, "parse error: the body is not valid UTF-8")
            self._lost_change(message, "a change that is not valid UTF-8 was dropped")
            return
        problem = _invalid_request(message)
        if problem is not None:
            self.reject(msg_id, INVALID_REQUEST, f"invalid request: {problem}")
            return
        if "method" in message and "params" not in message:
            message["params"] = None  # optional in JSON-RPC; pygls' message types insist on the key
        try:
            structured = self.structure_message(message)
        except Exception as e:
            self.counters["dropped_undecodable"] += 1
            log.warning("dropped a %s message that does not decode: %s", message.get("method", "response"), e)
            self._lost_change(message, f"a change that does not decode was dropped ({str(e)[:100]})")
            return
        self.handle_message(structured)

    def _lost_change(self, message: Any, reason: str) -> None:
        """A didChange that was not applied: the document it was for is out of sync with the editor,
        or, when it does not say which (its uri is unreadable), every open document may be."""
        if not isinstance(message, dict) or message.get("method") != types.TEXT_DOCUMENT_DID_CHANGE:
            return
        server = self._server
        if not server.initialized:
            return  # dropped anyway (LSP): nothing was applied before initialize
        params = message.get("params")
        document = params.get("textDocument") if isinstance(params, dict) else None
        uri = document.get("uri") if isinstance(document, dict) else None
        for doc in [server.documents.get(uri)] if isinstance(uri, str) else list(server.documents):
            if doc is not None:
                server.document_out_of_sync(doc.uri, reason)

    def receive_framing_error(self, reason: str, body: bytes | None) -> None:
        """Bytes the transport could not frame. A request found in them is answered; the rest is logged."""
        self.counters["framing_errors"] += 1
        msg_id = None
        if body is not None:
            try:
                message = json.loads(body)
            except (ValueError, RecursionError, UnicodeDecodeError):
                message = None
            if isinstance(message, dict) and "method" in message and _is_id(message.get("id")):
                msg_id = message["id"]
        self.reject(msg_id, PARSE_ERROR, f"framing error: {reason}; skipped to the next Content-Length header")

    def reject(self, msg_id: Any, code: int, message: str) -> None:
        """Answer a message that never reached a handler (``msg_id`` None: JSON-RPC's ``"id": null``)."""
        self.counters[f"rejected_{-code}"] += 1
        log.warning("%s (id %s)", message, json.dumps(msg_id))
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}})

    # ---- pygls overrides -------------------------------------------------------------------------------

    def _execute_handler(
        self,
        msg_id: str | int,
        handler: Callable[..., Any],
        callback: Callable[[Future[Any]], None],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        """pygls files the future of every async or generator handler under its id, and only requests'
        are ever removed: each notification left ~2 KB behind (20 MB per 10,000 keystrokes). Here
        each is removed when done, whatever the message was (only if it is still the one filed)."""

        def done(future: Future[Any]) -> None:
            if self._request_futures.get(msg_id) is future:
                del self._request_futures[msg_id]
            callback(future)

        if failpoints.fire("request-handler"):
            raise failpoints.InjectedFault("failpoint request-handler")
        super()._execute_handler(msg_id, handler, done, args, kwargs)

    def _send_response(self, msg_id: str | int, result: Any = None, error: types.ResponseError | None = None) -> None:
        if error is not None and error.code == INTERNAL_ERROR and error.data is not None and not self.show_tracebacks:
            error = types.ResponseError(code=error.code, message=error.message)  # the log has the traceback
        super()._send_response(msg_id, result, error)

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams) -> Generator[Any, Any, types.InitializeResult]:
        result = yield from super().lsp_initialize(params)
        # Advertise our extensions, so that our clients know they may opt in.
        result.capabilities.experimental = {STREAMING_CAPABILITY: True, "graniteStats": STATS}
        return result

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any) -> Generator[Any, Any, None]:
        """Stop: code 0 after shutdown, 1 without (LSP). pygls raised SystemExit from inside the handler,
        which the transport then swallowed; the transport now ends the process with this code."""
        if (user_handler := self.fm.features.get(types.EXIT)) is not None:
            yield user_handler, args, None
        self.exit_code = 0 if self._shutdown else 1
        if self.exit_code:
            log.warning("exit without shutdown: exiting with code 1")

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if isinstance(data, dict) and "method" in data and data.get("id") is not None:
                error = JsonRpcInvalidParams(f"invalid params for {data['method']}: {exc.__cause__ or exc}")
                self._send_response(data["id"], error=error.to_response_error())
                return _UNANSWERABLE
            raise

    def handle_message(self, message: Any) -> None:
        if message is _UNANSWERABLE:
            return
        method = getattr(message, "method", None)
        msg_id: Any = getattr(message, "id", None)
        is_request = method is not None and msg_id is not None
        if is_request and self._shutdown and method != types.EXIT:
            self._send_response(
                msg_id, error=JsonRpcInvalidRequest(f"{method}: the server is shutting down").to_response_error()
            )
            return
        if is_request and not self._server.initialized and method != types.INITIALIZE:
            self._send_response(
                msg_id, error=JsonRpcServerNotInitialized(f"{method}: initialize first").to_response_error()
            )
            return
        if method == types.INITIALIZE and self._server.initialized:
            refusal = JsonRpcInvalidRequest("initialize: the server is already initialized")
            self._send_response(msg_id, error=refusal.to_response_error())
            return
        if method is not None and not is_request and method != types.EXIT:
            # LSP: notifications before initialize are dropped (a didOpen then would be applied to a
            # session that has not started); a second initialized would load the model again.
            if not self._server.initialized or (method == types.INITIALIZED and self._initialized_seen):
                self.counters["dropped_notifications"] += 1
                log.warning("dropped %s: %s", method, "a second one" if self._server.initialized else "not initialized")
                return
            if method == types.INITIALIZED:
                self._initialized_seen = True
        if method == types.INITIALIZE:
            self._server.initialized = True
        if method == types.EXIT and self._server.exiting:
            log.warning("a second exit notification: already exiting")
            return
        if method == types.EXIT:
            self._server.exiting = True
        super().handle_message(message)

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams) -> Generator[Any, Any, None]:
        doc = params.text_document
        self._server.documents.open(doc.uri, doc.text, doc.version, doc.language_id)
        self._server.on_document_changed(doc.uri, 0)
        yield from ()

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams) -> Generator[Any, Any, None]:
        server = self._server
        uri = params.text_document.uri
        doc = server.documents.get(uri)
        if doc is None:
            log.warning("didChange for a document that is not open: %s", uri)
            return
        encoding = server.position_encoding
        line = 0
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                if doc.out_of_sync:
                    continue  # an edit of a text we do not have: only the whole text brings it back
                r = change.range
                start, end = (r.start.line, r.start.character), (r.end.line, r.end.character)
                if not (doc.has_position(*start) and doc.has_position(*end)):
                    where = f"{start[0]}:{start[1]}-{end[0]}:{end[1]}"
                    reason = f"a change at {where} is past the end of its {doc.line_count()} lines"
                    server.document_out_of_sync(uri, reason)
                    continue
                doc.apply_change(change.text, start, end, encoding)
                line = r.start.line
            else:
                doc.apply_change(change.text)
                if doc.out_of_sync:
                    doc.out_of_sync = None
                    log.info("%s is in sync again (the editor sent its whole text)", uri)
        doc.version = params.text_document.version
        server.on_document_changed(uri, line)
        yield from ()

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams) -> Generator[Any, Any, None]:
        uri = params.text_document.uri
        self._server.documents.close(uri)
        self._server.on_document_closed(uri)
        yield from ()
