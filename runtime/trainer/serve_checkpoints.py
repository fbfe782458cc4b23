"""The trainer's checkpoints over HTTP (`aurora train --serve-checkpoints-port`), so that
servers need no volume shared with the trainer: a server fetches a revision from the URL
in its candidate record, checks the sha256 the record carries and only then loads it
(aurora.runtime.fetch).

    GET /revisions/<revision>/draft.safetensors   the draft head's weights
    GET /revisions/<revision>/meta.json           what the checkpoint holds

Nothing else is served: not the optimizer state, not a folder still being written
(.tmp-*), not a path outside the checkpoint root. Read-only, in a background thread.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from aurora.runtime.fetch import DRAFT_FILE, META_FILE

log = logging.getLogger(__name__)

SERVED_FILES = (DRAFT_FILE, META_FILE)
_PATH = re.compile(r"^/revisions/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/([a-z.]+)$")


def revision_url(base_url: str, revision: str) -> str:
    """Where a revision is served, for its candidate record."""
    return f"{base_url.rstrip('/')}/revisions/{revision}"


def _handler(root: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _file(self) -> Path | None:
            match = _PATH.match(self.path)
            if match is None or match.group(2) not in SERVED_FILES:
                return None
            revision, name = match.groups()
            path = root / revision / name
            return path if path.is_file() and (root / revision / META_FILE).is_file() else None

        def _answer(self, body: bool) -> None:
            path = self._file()
            if path is None:
                self.send_error(HTTPStatus.NOT_FOUND, "no such revision file")
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            if body:
                with path.open("rb") as source:
                    shutil.copyfileobj(source, self.wfile)

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("checkpoint server: " + format, *args)

    return Handler


def serve_checkpoints(root: Path, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve `root`'s checkpoints on `port` from a daemon thread; returns the server
    (its `server_address` holds the port actually bound, for port 0)."""
    server = ThreadingHTTPServer((host, port), _handler(Path(root)))
    server.daemon_threads = True
    threading.Thread(
        target=server.serve_forever, name="aurora-checkpoint-server", daemon=True
    ).start()
    return server
