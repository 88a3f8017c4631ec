"""pygls' LSP protocol with our document sync and the guarantee that every request is answered once."""

from __future__ import annotations

import logging
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

if TYPE_CHECKING:
    from .server import GraniteServer

log = logging.getLogger(__name__)

STATS = "granite/stats"
STREAMING_CAPABILITY = "granitePartialCompletion"

_UNANSWERABLE = object()  # a request already answered with an error while it was being decoded


class GraniteProtocol(LanguageServerProtocol):
    """pygls' protocol with two changes of substance.

    Document sync goes to our own exact store instead of pygls' workspace copy, and every request gets
    exactly one response: pygls drops requests whose params do not deserialize, and requests that
    arrive before ``initialize`` or after ``shutdown``, without answering them, which leaves an editor
    waiting forever.
    """

    _server: GraniteServer

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        result = yield from super().lsp_initialize(params)
        # Advertise our extensions, so that our clients know they may opt in.
        result.capabilities.experimental = {STREAMING_CAPABILITY: True, "graniteStats": STATS}
        return result

    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if isinstance(data, dict) and "method" in data and data.get("id") is not None:
                error = JsonRpcInvalidParams(f"invalid params for {data['method']}: {exc.__cause__ or exc}")
                self._send_response(data["id"], error=error.to_response_error())
                return _UNANSWERABLE
            raise

    def handle_message(self, message) -> None:
        if message is _UNANSWERABLE:
            return
        method = getattr(message, "method", None)
        msg_id = getattr(message, "id", None)
        is_request = method is not None and msg_id is not None
        if is_request and self._shutdown and method != types.EXIT:
            error = JsonRpcInvalidRequest(f"{method}: the server is shutting down")
            self._send_response(msg_id, error=error.to_response_error())
            return
        if is_request and not self._server.initialized and method != types.INITIALIZE:
            error = JsonRpcServerNotInitialized(f"{method}: initialize first")
            self._send_response(msg_id, error=error.to_response_error())
            return
        if method == types.INITIALIZE:
            self._server.initialized = True
        if method == types.EXIT and self._server.exiting:
            log.warning("a second exit notification: already exiting")
            return
        if method == types.EXIT:
            self._server.exiting = True
        super().handle_message(message)

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        doc = params.text_document
        self._server.documents.open(doc.uri, doc.text, doc.version, doc.language_id)
        self._server.on_document_changed(doc.uri, 0)
        yield from ()

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
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
                r = change.range
                doc.apply_change(
                    change.text, (r.start.line, r.start.character), (r.end.line, r.end.character), encoding
                )
                line = r.start.line
            else:
                doc.apply_change(change.text)
        doc.version = params.text_document.version
        server.on_document_changed(uri, line)
        yield from ()

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        uri = params.text_document.uri
        self._server.documents.close(uri)
        self._server.on_document_closed(uri)
        yield from ()
