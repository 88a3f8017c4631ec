"""A local stand-in for the Hugging Face hub on 127.0.0.1, serving one directory as one repository.

It answers the three kinds of request ``huggingface_hub`` makes for ``snapshot_download`` (repo info,
the file tree, and ``resolve/`` file downloads with HEAD and byte ranges), so ``granite-lsp download``
runs its real code path with ``HF_ENDPOINT`` pointing here. It can drop the connection part-way through
a file's first download, and records the ``Range`` headers it gets, so a test can tell a resumed download
from one that started again.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def etag(path: Path) -> str:
    """The ETag served for a file; huggingface_hub names the cached blob (and its partial download) by it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@dataclass
class HubStandIn:
    repo_id: str
    root: Path  # the directory served as the repository
    drop_after: int = 0  # >0: each file's first full download stops after this many bytes (connection lost)
    ranges: list[str] = field(default_factory=list)  # Range headers received, "file: bytes=N-"
    gets: list[str] = field(default_factory=list)  # files downloaded (GET), in order
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_file())

    def __enter__(self) -> HubStandIn:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet test output
                pass

            def _json(self, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                prefix = f"/{hub.repo_id}/resolve/"
                if not path.lower().startswith(prefix.lower()):
                    self.send_error(404)
                    return
                name = path[len(prefix) :].split("/", 1)[1]
                target = hub.root / name
                if not target.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                data = target.read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    hub.ranges.append(f"{name}: {rng}")
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag(target)}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                hub.gets.append(name)
                if hub.drop_after and not start and hub.gets.count(name) == 1 and len(data) > hub.drop_after:
                    self.wfile.write(data[: hub.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection drops mid-file
                    return
                self.wfile.write(data[start:])

            def do_HEAD(self) -> None:
                self._file(head=True)

            def do_GET(self) -> None:
                path = urlparse(self.path).path
                api = f"/api/models/{hub.repo_id}"
                if path.lower().startswith(f"{api}/revision/".lower()):
                    self._json(
                        {
                            "id": hub.repo_id,
                            "sha": COMMIT,
                            "siblings": [{"rfilename": p.name} for p in hub.files()],
                        }
                    )
                elif path.lower().startswith(f"{api}/tree/".lower()):
                    self._json(
                        [
                            {"type": "file", "path": p.name, "size": p.stat().st_size, "oid": _sha1(p)}
                            for p in hub.files()
                        ]
                    )
                elif path.startswith("/api/"):
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.end_headers()
                else:
                    self._file(head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
