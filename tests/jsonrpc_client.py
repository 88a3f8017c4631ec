"""The plain LSP test client: it lives in ``granite_lsp/bench/client.py``, where the bench uses it too."""

from granite_lsp.bench.client import REPO, TINY, RpcClient, server_command

__all__ = ["REPO", "TINY", "RpcClient", "server_command"]
