"""The inference server as tests run it: ``create_app`` behind a real uvicorn server on a
free loopback port, in a thread of the test process (so the model loads once)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from aurora.runtime.embedded_redis import free_port
from aurora.runtime.server.app import create_app
from aurora.runtime.server.config import ServerConfig


class LiveServer:
    """create_app under a real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, cfg: ServerConfig, model: tuple[Any, Any] | None) -> None:
        target, tokenizer = model or (None, None)
        self.app = create_app(cfg, target, tokenizer)
        self.runtime = self.app.state.runtime
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(60)

    def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, json=body, **kwargs)

    def metric(self, line_prefix: str) -> float:
        """Sum of the samples whose line starts with ``line_prefix``."""
        text = self.client.get("/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(line_prefix)
        )


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """``condition()``'s first truthy value; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def server_config(**options: Any) -> ServerConfig:
    """A ServerConfig for in-process tests: one thread, no baseline arm, fast polling."""
    defaults: dict[str, Any] = dict(
        threads=1, baseline_share=0.0, poll_interval=0.1, server_id="test-server", seed=0
    )
    return ServerConfig(**{**defaults, **options})


@contextmanager
def live_servers(model: tuple[Any, Any]) -> Iterator[Callable[..., LiveServer]]:
    """``start(**options)`` starts a LiveServer on ``model``; all are stopped on exit,
    the last started first."""
    started: list[LiveServer] = []

    def start(**options: Any) -> LiveServer:
        server = LiveServer(server_config(**options), model).__enter__()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.__exit__()
