"""Shared fixtures: the tiny trained model shipped in model/tiny and its memorized FIM fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "model" / "tiny"


def load_fixtures() -> list[dict]:
    return json.loads((TINY / "fixtures.json").read_text())


def single_line_fixture() -> dict:
    """A fixture whose middle is one line: the server answers it whole in one response."""
    return next(f for f in load_fixtures() if not f.get("mid_token") and "\n" not in f["middle"])


def expected_text(fixture: dict) -> str:
    """The full file: the fixture's document with the memorized middle inserted at its cursor."""
    from granite_lsp.documents import Document

    doc = Document("x", fixture["text"])
    cursor = doc.offset_at(fixture["line"], fixture["character"])
    return fixture["text"][:cursor] + fixture["middle"] + fixture["text"][cursor:]


@pytest.fixture(scope="session")
def tiny_loaded():
    from granite_lsp.service import load
    from granite_lsp.settings import Settings

    return load(Settings().updated({"model": str(TINY), "device": "cpu", "dtype": "float32"}))


@pytest.fixture
def make_service(tiny_loaded):
    from granite_lsp.service import CompletionService
    from granite_lsp.settings import Settings

    def make(**options):
        settings = Settings().updated({"model": str(TINY), **options})
        return CompletionService(tiny_loaded, settings)

    return make


@pytest.fixture
def rpc():
    """A server process on model/tiny behind the plain JSON-RPC test client."""
    from jsonrpc_client import RpcClient

    client = RpcClient()
    yield client
    client.kill()


def _isa_levels() -> list[str]:
    """The kernels' ISA levels the exactness tests run at: every one this CPU has (from /proc/cpuinfo,
    so collecting does not build the extension), capped by GRANITE_LSP_ISA when it is set (CI runs
    once at avx2 and once at the highest level); one run when the kernels are disabled."""
    import os

    from granite_lsp.kernels import isa

    if os.environ.get("GRANITE_LSP_KERNELS", "1") == "0":
        return ["no-kernels"]
    levels = isa.cpu_levels()
    cap = os.environ.get("GRANITE_LSP_ISA")
    if cap in levels:
        levels = levels[: levels.index(cap) + 1]
    return levels or ["no-kernels"]


@pytest.fixture(scope="module", params=_isa_levels())
def isa_level(request):
    """Runs a module's tests at each ISA level in turn (``pytestmark = pytest.mark.usefixtures("isa_level")``);
    without the extension the level is moot and the tests run once."""
    from granite_lsp import kernels
    from granite_lsp.kernels import isa

    if request.param == "no-kernels" or not kernels.available():
        yield request.param
        return
    if request.param not in isa.levels():  # the CPU has it, this build does not (isa.h: GRANITE_HAVE_AMX)
        pytest.skip(f"the kernels were built without level {request.param} (this CPU has it)")
    with isa.at_level(request.param):
        yield request.param


def wait_stats(rpc, pred, what: str, timeout: float) -> dict:
    """granite/stats once ``pred(stats)`` holds; fails (rather than returning) if it never does.
    The timeout only bounds a hang: no elapsed time is asserted."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        stats = rpc.call("granite/stats")
        if pred(stats):
            return stats
        assert time.monotonic() < deadline, f"never {what}: {stats}"
        time.sleep(0.02)
