"""Helpers shared by the reliability suite's modules."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from aurora.runtime.protocol import TraceRecord
from aurora.runtime.server.config import ServerConfig


def fresh_copies(records: list[TraceRecord], copies: int) -> list[TraceRecord]:
    """``copies`` of every record, each with its own trace id (recurring prompts)."""
    return [
        r.model_copy(update={"trace_id": uuid.uuid4().hex}) for _ in range(copies) for r in records
    ]


class FaultyVolume:
    """A tmpfs of ``size`` in a private mount namespace (``unshare --user --mount``, no
    root needed), reached from this process through ``/proc/PID/root``. ``fill`` leaves
    it full (writes fail with ENOSPC), ``read_only`` remounts it (EROFS): real kernel
    errors, not mocks."""

    def __init__(self, mountpoint: Path, size: str) -> None:
        self.mountpoint = mountpoint
        script = (
            f"mount -t tmpfs -o size={size} tmpfs {mountpoint} && touch {mountpoint}/.ready "
            "&& exec sleep 3600"
        )
        self.process = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
            stderr=subprocess.PIPE,
        )
        self.path = Path(f"/proc/{self.process.pid}/root{mountpoint}")
        deadline = time.monotonic() + 10
        while not (self.path / ".ready").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                error = self.process.stderr.read().decode() if self.process.stderr else ""
                self.close()
                pytest.skip(f"no private tmpfs here (unshare --user --mount): {error.strip()}")
            time.sleep(0.02)

    def fill(self) -> None:
        """Write a filler file until the volume is full."""
        with open(self.path / ".filler", "ab") as sink:
            try:
                while True:
                    sink.write(b"\0" * (1 << 20))
                    sink.flush()
            except OSError:
                pass

    def free(self) -> None:
        (self.path / ".filler").unlink(missing_ok=True)

    def read_only(self, on: bool) -> None:
        option = "remount,ro" if on else "remount,rw"
        subprocess.run(
            ["nsenter", "-t", str(self.process.pid), "-U", "-m", "mount", "-o", option,
             str(self.mountpoint)],
            check=True,
        )  # fmt: skip

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def server_config(**options: Any) -> ServerConfig:
    """A test server's configuration: one thread, no baseline share, fast polling."""
    settings: dict[str, Any] = dict(
        threads=1, baseline_share=0.0, poll_interval=0.1, server_id="reliability", seed=0
    )
    return ServerConfig(**{**settings, **options})
