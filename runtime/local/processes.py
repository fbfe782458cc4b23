"""The processes of an `aurora local` run: one `aurora serve` per server and one
`aurora train`, each spawned with the command line generated from its configuration, and
stopped together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from aurora.runtime.local.config import LocalConfig
from aurora.runtime.options import option_args, to_args
from aurora.runtime.server.config import ServerConfig
from aurora.runtime.trainer.config import TrainerConfig


def server_config(config: LocalConfig, index: int, port: int, redis_url: str) -> ServerConfig:
    """Server `index`'s configuration (checked here, before anything is spawned)."""
    return ServerConfig(
        model=config.model,
        speculator=f"{config.namespace}/{config.name}",
        redis_url=redis_url,
        checkpoint_dir=str(config.workdir / "checkpoints"),
        port=port,
        draft=config.server_draft,
        spec_tokens=config.spec_tokens,
        baseline_share=float(config.rollout.baseline_share),
        threads=config.server_threads,
        max_batch=config.server_max_batch,
        server_id=f"local-server-{index}",
        seed=config.seed + index,
    )


def trainer_config(config: LocalConfig, redis_url: str) -> TrainerConfig:
    """The trainer's configuration for this run (checked here, before anything is spawned)."""
    return TrainerConfig(
        model=config.model,
        speculator=f"{config.namespace}/{config.name}",
        redis_url=redis_url,
        checkpoint_dir=config.workdir / "checkpoints",
        spec_tokens=config.spec_tokens,
        first_candidate_after=config.first_candidate_after,
        publish_every=config.publish_every,
        lr=config.lr,
        lambda_discard=config.lambda_discard,
        min_accept_length=config.min_accept_length,
        steps_per_trace=config.steps_per_trace,
    )


def trainer_args(config: LocalConfig, redis_url: str) -> list[str]:
    """`aurora train`'s command line for this run: the trainer's configuration, and the
    process's torch threads (`aurora train --threads`)."""
    threads = option_args({"threads": config.trainer_threads})
    return [*to_args(trainer_config(config, redis_url)), *threads]


class Processes:
    """`aurora` subcommands running in their own sessions, each logging to a file."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def spawn(self, command: str, args: list[str], log_name: str) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / log_name, "wb")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "aurora", command, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running.append(process)

    def wait_ready(self, ports: list[int], timeout: float = 300.0) -> None:
        """Until every server on `ports` answers /ready; fails when a process exits first."""
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                for p in self.running:
                    if p.poll() is not None:
                        raise RuntimeError(
                            f"a process exited early with {p.returncode}; see {self.logs}"
                        )
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server on port {port} not ready after {timeout:.0f} s")
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what has not exited 20 s later."""
        for p in self.running:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.running:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
