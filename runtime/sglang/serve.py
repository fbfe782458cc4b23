"""Serving with SGLang: start it with the right draft, restart it into another.

``python3 -m aurora.runtime.sglang.serve`` (the command ``launcher.server_command``
builds) refuses an SGLang release Aurora does not support, reads which revision this
server's role should serve (Redis ``desired``; the spec's initial draft when there is
none yet), exports it in SGLang's layout if it is a checkpoint, and replaces itself
(exec) with ``python3 -m sglang.launch_server`` and that launch's flags.

SGLang cannot turn speculation on or off, or change the draft vocabulary, in a running
server. When the desired revision needs that (day 0 without a draft → the first learned
EAGLE-3 draft on the canary replicas, its promotion on the stable ones, a fallback to
no draft, a new vocabulary, a swap that failed), the plugin's watcher (weights.py)
exports the revision, takes one of ``AURORA_SGLANG_RESTART_PARALLEL`` restart slots in
Redis (so the replicas restart one at a time and keep serving capacity), and stops the
server: Kubernetes restarts the container in the same pod, and this module starts SGLang
with the new revision (its export is already in the pod's cache). A revision SGLang did
not come up with twice is marked failed and the initial draft is launched instead; the
watcher reports the failure so the rollout rejects it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aurora.paths import aurora_home
from aurora.runtime.sglang.launcher import (
    Launch,
    Speculation,
    initial_launch,
    is_checkpoint,
    launch_for,
    revision_of_draft,
    sglang_command,
)

log = logging.getLogger("aurora.sglang")

MAX_START_ATTEMPTS = 2  # SGLang starts with a revision before it is marked failed
KEEP_EXPORTS = 1  # earlier draft exports kept besides the one being started (~1 GB at 8B)
DRAIN_S = 120.0  # a restart waits this long for in-flight requests, then exits anyway
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes shows it as the container's message


# ------------------------------------------------- drafts on the pod, restart slots


class Drafts:
    """EAGLE-3 draft directories exported for this server (on the pod's /tmp, which
    outlives a container restart), and markers of starts into them. ``client`` (Redis)
    lets a checkpoint that is on no volume this server shares be fetched from where the
    trainer published it, as the torch server does."""

    def __init__(self, root: str | Path, checkpoint_dir: str | None, client: Any = None,
                 keys: Any = None) -> None:  # fmt: skip
        self.root, self.checkpoint_dir = Path(root), checkpoint_dir or None
        self.client, self.keys = client, keys

    @classmethod
    def of(cls, settings: Any, client: Any = None) -> Drafts:
        # the pod's /cache emptyDir (XDG_CACHE_HOME): larger than /tmp, and it outlives a
        # container restart
        root = settings.drafts_dir or aurora_home() / "sglang-drafts"
        return cls(root, settings.checkpoint_dir, client, settings.keys)

    def source_of(self, ref: Any) -> Path:
        """The revision's checkpoint on this server: in the checkpoint dir, else fetched
        (when its candidate record names a URL), else the ref's own path."""
        from aurora.runtime.server.revisions import RevisionFetcher, RevisionLoader

        def builtin(name: Any) -> Any:
            raise ValueError(f"{name!r} has no checkpoint")

        fetch = RevisionFetcher(self.client, self.keys) if self.client is not None else None
        return RevisionLoader(builtin, builtin, self.checkpoint_dir, fetch).resolve(ref)

    def prepare(self, ref: Any) -> Path:
        """An SGLang EAGLE-3 directory holding ``ref``: the checkpoint path itself when it
        already is one, a valid earlier export, or a fresh export (verified). Raises
        ExportError or CheckpointError naming the problem."""
        from aurora.runtime.sglang.export import ExportError, export_revision, load_export

        source = self.source_of(ref)
        if revision_of_draft(source) == ref.revision:
            load_export(source)
            return source
        out = self.root / ref.revision
        try:
            if load_export(out).revision == ref.revision:
                return out
        except ExportError:
            pass
        self.root.mkdir(parents=True, exist_ok=True)
        export_revision(source, out, overwrite=True)
        self._prune(keep=out)
        return out

    def _prune(self, keep: Path) -> None:
        exports = sorted(
            (
                p
                for p in self.root.iterdir()
                if p.is_dir() and p != keep and not p.name.startswith(".")
            ),
            key=lambda p: p.stat().st_mtime,
        )
        for old in exports[: max(len(exports) - KEEP_EXPORTS, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def _marker(self, kind: str, revision: str) -> Path:
        return self.root / f".{kind}-{revision}"

    def attempts(self, revision: str) -> int:
        """Starts into ``revision`` that never reported healthy."""
        try:
            return int(self._marker("starting", revision).read_text() or 0)
        except (OSError, ValueError):
            return 0

    def starting(self, revision: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._marker("starting", revision).write_text(str(self.attempts(revision) + 1))

    def started(self, revision: str) -> None:
        self._marker("starting", revision).unlink(missing_ok=True)

    def failed(self, revision: str) -> bool:
        """SGLang did not come up with ``revision`` MAX_START_ATTEMPTS times."""
        return self.attempts(revision) >= MAX_START_ATTEMPTS


class RestartSlots:
    """At most ``slots`` servers of a Speculator restart at once: a server takes a slot
    (a Redis key with a TTL) before it stops and frees it once it serves again."""

    def __init__(self, client: Any, keys: Any, server: str, slots: int, ttl_s: float) -> None:
        self.client, self.keys, self.server = client, keys, server
        self.slots, self.ttl_ms = slots, int(ttl_s * 1000)

    def acquire(self) -> bool:
        """Take (or keep) a slot; False when every slot is held by another server."""
        for index in range(self.slots):
            key = self.keys.restart_slot(index)
            if self.client.set(key, self.server, nx=True, px=self.ttl_ms):
                return True
            if _text(self.client.get(key)) == self.server:
                self.client.pexpire(key, self.ttl_ms)
                return True
        return False

    def release(self) -> None:
        for index in range(self.slots):
            key = self.keys.restart_slot(index)
            with self.client.pipeline() as pipe:  # delete only our own slot
                try:
                    pipe.watch(key)
                    if _text(pipe.get(key)) == self.server:
                        pipe.multi()
                        pipe.delete(key)
                        pipe.execute()
                except Exception:  # WatchError: someone else's now; leave it
                    pass


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def terminate(reason: str) -> None:
    """Stop this SGLang server so its container restarts (Kubernetes restarts it in the
    same pod, and the launcher starts the new revision): SIGTERM drains in-flight
    requests; after DRAIN_S the process exits regardless."""
    with contextlib.suppress(OSError):  # not in Kubernetes
        Path(TERMINATION_LOG).write_text(f"aurora: {reason}\n")
    log.warning("aurora: restarting SGLang: %s", reason)
    deadline = threading.Timer(DRAIN_S, os._exit, args=(0,))
    deadline.daemon = True
    deadline.start()
    os.kill(os.getpid(), signal.SIGTERM)


class Restarter:
    """What the plugin's watcher needs to restart SGLang into another revision."""

    def __init__(
        self,
        settings: Any,
        client: Any,
        *,
        initial: Launch,
        drafts: Drafts | None = None,
        exit: Callable[[str], None] = terminate,
    ) -> None:
        self.initial, self.exit = initial, exit
        self.drafts = drafts or Drafts.of(settings, client)
        self.slots = RestartSlots(
            client, settings.keys, settings.server, settings.restart_parallel,
            settings.restart_timeout_s,
        )  # fmt: skip

    def prepare(self, ref: Any) -> None:
        """Everything the launcher needs for ``ref`` (its export), or an exception
        saying why the revision cannot be launched."""
        if ref is not None and is_checkpoint(ref):
            if self.drafts.failed(ref.revision):
                raise RuntimeError(
                    f"SGLang did not come up with draft {ref.revision} in "
                    f"{MAX_START_ATTEMPTS} starts (see the previous container's log)"
                )
            self.drafts.prepare(ref)

    def started(self, launch: Launch) -> None:
        """The server is healthy with ``launch``: clear its start marker, free the slot."""
        if launch.revision:
            self.drafts.started(launch.revision)
        self.slots.release()


# ------------------------------------------------------------------------- start


def launch_at_start(settings: Any, initial: Launch, drafts: Drafts | None = None) -> Launch:
    """The launch for this server's role now: the desired revision when Redis names one
    and it can be launched, else the initial draft (the watcher then reports why)."""
    import redis

    from aurora.runtime.protocol import ProtocolError, connect, get_desired
    from aurora.runtime.sglang.weights import wanted

    client = connect(settings.redis_url)
    drafts = drafts or Drafts.of(settings, client)
    try:
        desired = get_desired(client, settings.keys)
    except (redis.RedisError, OSError, ProtocolError) as error:
        log.warning("aurora: cannot read the desired revision (%s): starting %s", error, initial)
        return initial
    ref = None if desired is None else wanted(desired, settings.role)
    if ref is not None and is_checkpoint(ref) and drafts.failed(ref.revision):
        log.error("aurora: SGLang did not start with draft %s before: starting %s", ref, initial)
        return initial
    try:
        launch = launch_for(ref, initial, drafts.prepare)
    except Exception as error:  # the checkpoint is gone or invalid: serve what we can
        log.error("aurora: cannot launch revision %s (%s): starting %s", ref, error, initial)
        return initial
    if ref is not None and is_checkpoint(ref):
        drafts.starting(launch.revision)
    return launch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m aurora.runtime.sglang.serve",
        description="Start SGLang with the draft this server's role should serve (Redis "
        "'desired', else --initial), then hand over to sglang.launch_server. Arguments "
        "after -- go to SGLang.",
    )
    parser.add_argument("--initial", required=True, help="scratch, ngram or /path/to/draft")
    parser.add_argument("--speculative-num-steps", type=int, required=True)
    parser.add_argument("--speculative-eagle-topk", type=int, required=True)
    parser.add_argument("--speculative-num-draft-tokens", type=int, required=True)
    parser.add_argument("sglang_args", nargs=argparse.REMAINDER, help="-- SGLang arguments")
    return parser


def main(argv: Sequence[str] | None = None, *, execute: Callable[..., Any] = os.execvpe) -> int:
    """Refuse an unsupported SGLang, choose the launch, exec SGLang (``execute``)."""
    from aurora.runtime.sglang import UnsupportedVersion, installed_version, require_supported
    from aurora.runtime.sglang.plugin import PluginSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = _parser().parse_args(argv)
    sglang_args = list(args.sglang_args)
    if sglang_args[:1] == ["--"]:
        sglang_args = sglang_args[1:]
    try:
        version = require_supported(installed_version())
        initial = initial_launch(args.initial)
        settings = PluginSettings.from_env(os.environ)
    except (UnsupportedVersion, ValueError) as error:
        print(f"aurora: {error}", file=sys.stderr)
        return 2
    speculation = Speculation(
        args.speculative_num_steps, args.speculative_eagle_topk, args.speculative_num_draft_tokens
    )
    launch = initial if settings is None else launch_at_start(settings, initial)
    env = dict(os.environ)
    env.setdefault("AURORA_SGLANG_RESTART", "1")  # the watcher may restart into a revision
    env["AURORA_SGLANG_INITIAL"] = args.initial
    command = sglang_command(launch, speculation, sglang_args, python=sys.executable)
    log.info("aurora: SGLang %s serving %s: %s", version, launch.revision or launch, command)
    execute(command[0], command, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
