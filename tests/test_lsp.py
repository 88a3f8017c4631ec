"""The real server process through pytest-lsp: capabilities, exact completions, edits, UTF-16, errors."""

from __future__ import annotations

import asyncio
import sys

import pytest
import pytest_lsp
from conftest import TINY, load_fixtures
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

SERVER = [sys.executable, "-m", "granite_lsp", "--stdio", "--model", str(TINY), "--device", "cpu"]


def _plain(obj):
    """pygls hands unknown result types back as namedtuples: turn them into dicts again."""
    if hasattr(obj, "_asdict"):
        return {k: _plain(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


async def _stats(client: LanguageClient) -> dict:
    return _plain(await client.protocol.send_request_async("granite/stats", None))


# Safety nets against a hung server, not timings: a first start compiles the kernels (minutes on a
# busy 2-core machine), and reaching one fails the test.
LOAD_TIMEOUT = 900.0


async def _wait_loaded(client: LanguageClient, timeout: float = LOAD_TIMEOUT) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        stats = await _stats(client)
        if stats["model_loaded"] or stats["load_error"]:
            return stats
        if loop.time() > deadline:
            raise TimeoutError("model did not load")
        await asyncio.sleep(0.1)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient):
    params = types.InitializeParams(
        capabilities=types.ClientCapabilities(
            general=types.GeneralClientCapabilities(position_encodings=[types.PositionEncodingKind.Utf16])
        )
    )
    result = await lsp_client.initialize_session(params)
    lsp_client.init_result = result
    stats = await _wait_loaded(lsp_client)
    assert stats["model_loaded"], stats
    yield
    await lsp_client.shutdown_session()


def _open(client: LanguageClient, uri: str, text: str, version: int = 1) -> None:
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)
        )
    )


async def _complete(client: LanguageClient, uri: str, line: int, character: int, automatic: bool = False):
    kind = types.InlineCompletionTriggerKind.Automatic if automatic else types.InlineCompletionTriggerKind.Invoked
    return await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=line, character=character),
            context=types.InlineCompletionContext(trigger_kind=kind),
        )
    )


async def test_capabilities(client: LanguageClient) -> None:
    caps = client.init_result.capabilities
    assert caps.inline_completion_provider is not None
    assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental
    assert caps.position_encoding == types.PositionEncodingKind.Utf16
    assert "granite.accepted" in caps.execute_command_provider.commands


async def _idle(client: LanguageClient, timeout: float = 300.0) -> None:
    """Wait until the model worker has finished what it was generating in the background. The
    timeout only keeps a hung server from hanging the suite: reaching it fails the test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await _stats(client))["worker"]["busy"]:
        if loop.time() > deadline:
            raise TimeoutError(f"the model worker was still busy after {timeout:.0f} s")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fixture", load_fixtures(), ids=lambda f: f"{f['file']}:{f['line']}:{f['character']}")
async def test_memorized_completion(client: LanguageClient, fixture: dict) -> None:
    """The exact middle; a multi-line one arrives line first, the rest served after accepting that line."""
    uri = "file:///fixture/" + fixture["file"].split("/")[-1]
    _open(client, uri, fixture["text"])
    result = await _complete(client, uri, fixture["line"], fixture["character"])
    assert result is not None and result.items, "no completion"
    item = result.items[0]
    pos = types.Position(line=fixture["line"], character=fixture["character"])
    assert item.range == types.Range(start=pos, end=pos)
    middle = fixture["middle"]
    assert middle.startswith(item.insert_text) and item.insert_text.strip()
    if item.insert_text == middle:
        return
    # Accept the first line, as an editor would: then the rest comes from the suggestion in memory.
    accepted = item.insert_text
    assert "\n" not in accepted.strip("\n") and middle[len(accepted)] == "\n"
    await _idle(client)
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[
                types.TextDocumentContentChangePartial(range=types.Range(start=pos, end=pos), text=accepted)
            ],
        )
    )
    line = pos.line + accepted.count("\n")
    character = len(accepted.split("\n")[-1].encode("utf-16-le")) // 2 + (pos.character if "\n" not in accepted else 0)
    rest = await _complete(client, uri, line, character)
    assert rest is not None and rest.items
    assert accepted + rest.items[0].insert_text == middle
    stats = await _stats(client)
    assert stats["typed_through"] >= 1


async def test_incremental_edits_then_completion(client: LanguageClient) -> None:
    """Open the file with the middle's line half typed, then type the rest as incremental edits."""
    fixture = next(f for f in load_fixtures() if not f.get("mid_token") and f["character"] == 0)
    uri = "file:///fixture/edited.py"
    _open(client, uri, fixture["text"])
    typed = fixture["middle"].split("\n")[0][:6]
    line = fixture["line"]
    for version, ch in enumerate(typed, start=2):
        col = version - 2
        client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[
                    types.TextDocumentContentChangePartial(
                        range=types.Range(
                            start=types.Position(line=line, character=col), end=types.Position(line=line, character=col)
                        ),
                        text=ch,
                    )
                ],
            )
        )
    result = await _complete(client, uri, line, len(typed))
    assert result is not None and result.items
    got = typed + result.items[0].insert_text
    # The whole middle, or (multi-line, answered early) exactly its first line.
    assert got in (fixture["middle"], fixture["middle"].split("\n")[0])


async def test_unknown_document_and_bad_position_answer_null(client: LanguageClient) -> None:
    assert await _complete(client, "file:///not/open.py", 0, 0) is None
    _open(client, "file:///short.py", "x = 1\n")
    assert await _complete(client, "file:///short.py", 10, 0) is None
    assert await _complete(client, "file:///short.py", 0, 50) is None


MISSING = [sys.executable, "-m", "granite_lsp", "--stdio", "--model", "/nonexistent/granite-model", "--device", "cpu"]


@pytest_lsp.fixture(config=ClientServerConfig(server_command=MISSING))
async def missing_client(lsp_client: LanguageClient):
    await lsp_client.initialize_session(types.InitializeParams(capabilities=types.ClientCapabilities()))
    yield
    await lsp_client.shutdown_session()


async def test_missing_model_shows_message_and_stays_up(missing_client: LanguageClient) -> None:
    stats = await _wait_loaded(missing_client)
    assert not stats["model_loaded"]
    assert "/nonexistent/granite-model" in stats["load_error"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60.0
    while not missing_client.messages:
        if loop.time() > deadline:
            raise TimeoutError("no window/showMessage about the missing model")
        await asyncio.sleep(0.1)
    message = missing_client.messages[-1]
    assert message.type == types.MessageType.Error
    assert "was not found" in message.message and "--model" in message.message
    _open(missing_client, "file:///a.py", "def f():\n    ")
    assert await _complete(missing_client, "file:///a.py", 1, 4) is None
