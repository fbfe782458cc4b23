"""Draft revisions in a server: which are loaded, which request gets which, hot swaps.

The server holds a stable revision and optionally a candidate (on canary). Each
request is routed by shares to the stable draft, the candidate, or the live baseline
(no speculation). What is served is one immutable ``Served`` snapshot; a swap
replaces the reference under a lock, so a request keeps the draft it started with
and the next request takes the new one. Loading a checkpoint (read, checksum,
shape and NaN checks, building the head) happens in the watcher thread, off the
decode path; the decode worker is blocked only while the reference is replaced.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import redis

from aurora.runtime.cost import Adaptive, VerifyCost, measure_draft_step
from aurora.runtime.draft import EagleDraftHead, EagleProposer, NgramProposer
from aurora.runtime.fetch import fetch_revision, prune_fetched
from aurora.runtime.protocol import (
    BUILTIN_REVISIONS,
    Builtin,
    DesiredState,
    Keys,
    LoadedReport,
    ProtocolError,
    RevisionRef,
    get_candidate,
    get_desired,
    hybrid_head,
    report_loaded,
)
from aurora.runtime.retry import FailedLoads
from aurora.runtime.suffix import HybridProposer, SuffixCache, SuffixProposer

log = logging.getLogger(__name__)

Arm = Literal["stable", "candidate", "baseline"]


class RoutingError(ValueError):
    """A request asked for an arm or revision this server does not serve now."""


@dataclass(frozen=True)
class Revision:
    """A loaded draft revision; ``proposer`` None means no speculation (Builtin.NONE)."""

    name: str
    proposer: Any | None
    path: str = ""


@dataclass(frozen=True)
class Served:
    """What the server serves: one immutable snapshot, replaced whole on a swap."""

    stable: Revision
    candidate: Revision | None = None
    candidate_share: float = 0.0
    baseline_share: float = 0.0

    def route(
        self, u: float, *, arm: Arm | None = None, revision: str | None = None
    ) -> tuple[Arm, Revision]:
        """The arm and revision for a request with uniform draw ``u`` in [0, 1): the
        first ``baseline_share`` of the unit interval is the baseline, the next
        ``candidate_share`` the candidate (when one is loaded), the rest stable. A
        request may pin an ``arm`` or a loaded ``revision``; RoutingError otherwise."""
        if revision is not None:
            pinned = [
                (role, rev)
                for role, rev in (("stable", self.stable), ("candidate", self.candidate))
                if rev is not None and rev.name == revision and arm in (None, role)
            ]
            if not pinned:
                raise RoutingError(
                    f"revision={revision!r} is not served here{f' as arm={arm!r}' if arm else ''}: "
                    f"stable is {self.stable.name!r}, candidate is "
                    f"{self.candidate.name if self.candidate else None!r}; omit revision or pick one of those"
                )
            role, rev = pinned[0]
            return role, rev  # type: ignore[return-value]
        if arm is None:
            arm = choose_arm(
                u, self.candidate_share, self.baseline_share, self.candidate is not None
            )
        if arm == "candidate":
            if self.candidate is None:
                raise RoutingError(
                    "arm='candidate' but no candidate revision is loaded: omit arm or use 'stable'"
                )
            return arm, self.candidate
        return arm, self.stable

    def roles(self) -> dict[str, str]:
        """role → revision name."""
        roles = {"stable": self.stable.name}
        if self.candidate is not None:
            roles["candidate"] = self.candidate.name
        return roles


def choose_arm(u: float, candidate_share: float, baseline_share: float, has_candidate: bool) -> Arm:
    """Map a uniform draw to an arm (see ``Served.route``). Without a candidate its
    share goes to stable, never to the baseline, so the baseline share stays exact."""
    if u < baseline_share:
        return "baseline"
    if has_candidate and u < baseline_share + candidate_share:
        return "candidate"
    return "stable"


class Router:
    """Seeded routing draws: the same seed routes the same request sequence the same way."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def draw(self) -> float:
        with self._lock:
            return self._rng.random()


class RevisionSet:
    """The current ``Served`` snapshot behind a lock."""

    def __init__(self, served: Served) -> None:
        self._served = served
        self._lock = threading.Lock()

    def snapshot(self) -> Served:
        with self._lock:
            return self._served

    def swap(self, served: Served) -> float:
        """Replace the snapshot; returns how long the lock was held (seconds): the
        longest a decode worker can have been blocked by this swap."""
        with self._lock:
            start = time.perf_counter()
            self._served = served
            held = time.perf_counter() - start
        return held


# ------------------------------------------------------------------------ proposers


class Speculation:
    """What every proposer of a server shares, and how each kind is built: the global
    suffix cache over served outputs (the worker adds each finished request) and the
    verify cost (the worker measures it at start; a prior until then)."""

    def __init__(
        self,
        cache: SuffixCache,
        cost: VerifyCost,
        adaptive: bool = True,
        *,
        spec_tokens: int = 4,
        suffix_tokens: int = 0,
    ) -> None:
        self.cache, self.cost, self.adaptive = cache, cost, adaptive
        # k of heads; a suffix draft's reach (0: the same k)
        self.spec_tokens, self.suffix_tokens = spec_tokens, suffix_tokens or None

    def suffix(self) -> SuffixProposer:
        return SuffixProposer(self.cache, cost=self.cost, spec_tokens=self.suffix_tokens)

    def builtin(self, name: str) -> Revision | None:
        """ngram, suffix or none (scratch needs the target: the caller builds its head)."""
        if name == Builtin.NGRAM:
            return Revision(Builtin.NGRAM, NgramProposer(revision=Builtin.NGRAM))
        if name == Builtin.SUFFIX:
            return Revision(Builtin.SUFFIX, self.suffix())
        if name == Builtin.NONE:
            return Revision(Builtin.NONE, None)
        return None

    def head(
        self, head: EagleDraftHead, revision: str, path: str = "", *, adaptive: bool | None = None
    ) -> Revision:
        """A draft head's revision; adaptive (with its draft step timed now) unless off."""
        if not (self.adaptive if adaptive is None else adaptive):
            return Revision(revision, EagleProposer(head, revision), path)
        plan = Adaptive(self.cost, draft_step_s=measure_draft_step(head))
        return Revision(revision, EagleProposer(head, revision, plan), path)

    def hybrid(self, inner: Revision) -> Revision:
        """``hybrid:<inner>`` over a head revision (made adaptive if it is not)."""
        learned = inner.proposer
        if not isinstance(learned, EagleProposer):
            raise ValueError(
                f"hybrid:{inner.name}: a hybrid needs a draft head revision (scratch or a "
                f"checkpoint), not {inner.name!r}"
            )
        if learned.adaptive is None:
            plan = Adaptive(self.cost, draft_step_s=measure_draft_step(learned.head))
            learned = EagleProposer(learned.head, inner.name, plan)
        proposer = HybridProposer(self.suffix(), learned, head_tokens=self.spec_tokens)
        return Revision(proposer.revision, proposer, inner.path)


# ------------------------------------------------------------------------ loading


class RevisionFetcher:
    """The fetch step for servers that share no volume with the trainer: the revision's
    candidate record names the URL it was published at and the sha256 of its weights;
    the checkpoint is downloaded, checked and renamed into place (aurora.runtime.fetch),
    and older fetched revisions are pruned so the server's volume stays bounded."""

    def __init__(self, client: redis.Redis, keys: Keys, keep: int = 3) -> None:
        self.client, self.keys, self.keep = client, keys, keep

    def __call__(self, ref: RevisionRef, dest: Path) -> Path | None:
        """`dest` holding the fetched revision; None when its record names no URL (the
        trainer shares a volume with this server instead)."""
        record = get_candidate(self.client, self.keys, ref.revision)
        if record is None or not record.url:
            return None
        fetch_revision(record.url, ref.revision, record.sha256, dest)
        prune_fetched(dest.parent, self.keep, protect={ref.revision})
        return dest


class RevisionLoader:
    """Builds a Revision from a revision name and checkpoint path.

    ``build_builtin(name)`` makes the checkpoint-free ones (ngram, suffix, none,
    scratch); ``build_head(path)`` loads and verifies a checkpoint and returns (revision
    name recorded in its metadata, proposer); ``build_hybrid(head revision)`` wraps a
    head revision as ``hybrid:<revision>``, whose path is its head's checkpoint. With
    ``fetch`` (a RevisionFetcher), a checkpoint that is not on this server's disk is
    downloaded first."""

    def __init__(
        self,
        build_builtin: Callable[[str], Revision],
        build_head: Callable[[Path], Revision],
        checkpoint_dir: str | None,
        fetch: Callable[[RevisionRef, Path], Path | None] | None = None,
        build_hybrid: Callable[[Revision], Revision] | None = None,
    ) -> None:
        self.build_builtin, self.build_head = build_builtin, build_head
        self.checkpoint_dir, self.fetch = checkpoint_dir, fetch
        self.build_hybrid = build_hybrid

    def resolve(self, ref: RevisionRef) -> Path:
        """The checkpoint's folder on this server: already in `checkpoint_dir`, else
        downloaded from where the trainer published it (when its record says), else the
        ref's own path (a volume shared with the trainer)."""
        if self.checkpoint_dir and (Path(self.checkpoint_dir) / ref.revision).is_dir():
            return Path(self.checkpoint_dir) / ref.revision
        if self.fetch is not None:
            fetched = self.fetch(ref, Path(self.checkpoint_dir or ".") / ref.revision)
            if fetched is not None:
                return fetched
        return self.path_of(ref)

    def path_of(self, ref: RevisionRef) -> Path:
        """The ref's own path when it exists, else ``<checkpoint_dir>/<revision>``."""
        if ref.path and Path(ref.path).is_dir():
            return Path(ref.path)
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir) / ref.revision
        return Path(ref.path or ref.revision)

    def load(self, ref: RevisionRef) -> Revision:
        head = hybrid_head(ref.revision)
        if head is not None:
            if self.build_hybrid is None:
                raise ValueError(f"this server cannot serve hybrid revisions ({ref.revision!r})")
            return self.build_hybrid(self.load(RevisionRef(revision=head, path=ref.path)))
        if ref.revision in BUILTIN_REVISIONS and not ref.path:
            return self.build_builtin(ref.revision)
        path = self.resolve(ref)
        revision = self.build_head(path)
        if revision.name != ref.revision:
            raise ValueError(
                f"checkpoint {path} holds revision {revision.name!r}, the desired state names "
                f"{ref.revision!r}: fix the desired state's path"
            )
        return revision


@dataclass
class SwapEvent:
    """One applied change, for metrics and the report."""

    served: Served
    pause_s: float
    # False when only the traffic shares changed: no revision was swapped in or out
    revisions_changed: bool = True


class RevisionWatcher:
    """Polls the desired state in Redis and reconciles the served revisions with it.

    A revision that fails to load is reported and the server keeps serving what it has;
    it is tried again later (``FailedLoads``: 10 s, doubling to 300 s) while the desired
    state still names it: a server must not stay on the wrong stable revision for good."""

    def __init__(
        self,
        revisions: RevisionSet,
        loader: RevisionLoader,
        client: redis.Redis,
        keys: Keys,
        server_id: str,
        *,
        poll_interval: float = 0.5,
        report_interval: float = 10.0,
        on_swap: Callable[[SwapEvent], None] = lambda event: None,
    ) -> None:
        self.revisions, self.loader, self.client, self.keys = revisions, loader, client, keys
        self.server_id, self.poll_interval, self.on_swap = server_id, poll_interval, on_swap
        # by (revision, path): the error and when to try it again
        self.failed = FailedLoads()
        self.last_pause_ms: float | None = None
        self.last_swap_at: float | None = None
        self.report_interval = report_interval
        self._last_report: tuple[Any, ...] | None = None
        self._reported_at = 0.0
        self._last_problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="aurora-revision-watcher", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        backoff = self.poll_interval
        while not self._stop.is_set():
            try:
                self.poll()
                backoff = self.poll_interval
                self._problem(None)
            except (redis.RedisError, OSError) as error:
                self._problem(
                    f"Redis is unreachable ({type(error).__name__}); keeping the served revisions"
                )
                self._last_report = None  # report again once it is back
                backoff = min(backoff * 2, 5.0)
            except ProtocolError as error:
                self._problem(f"ignoring the desired state: {error}")
            except Exception:  # never let the watcher die: it is the only way to swap
                log.exception("revision watcher poll failed; retrying")
            self._stop.wait(backoff)

    def _problem(self, message: str | None) -> None:
        if message != self._last_problem and message is not None:
            log.warning("%s", message)
        elif message is None and self._last_problem is not None:
            log.info("revision watcher: Redis is reachable again")
        self._last_problem = message

    def poll(self) -> SwapEvent | None:
        """Read the desired state once and apply it; report what is loaded."""
        desired = get_desired(self.client, self.keys)
        if desired is not None:
            return self.apply(desired)
        self.report(None)
        return None

    def apply(self, desired: DesiredState) -> SwapEvent | None:
        current = self.revisions.snapshot()
        errors: list[str] = []
        stable = current.stable
        if desired.stable is not None:
            stable = self._resolve(desired.stable, current, errors) or current.stable
        candidate = current.candidate
        if desired.candidate is None:
            candidate = None
        else:
            candidate = self._resolve(desired.candidate, current, errors) or current.candidate
        served = replace(
            current,
            stable=stable,
            candidate=candidate,
            candidate_share=desired.candidate_share,
            baseline_share=desired.baseline_share,
        )
        event = None
        if served != current:
            pause = self.revisions.swap(served)
            event = SwapEvent(served, pause, served.roles() != current.roles())
            if event.revisions_changed:
                self.last_pause_ms = pause * 1000.0
                self.last_swap_at = time.time()
                log.info(
                    "serving stable=%s candidate=%s (swap paused decoding %.3f ms)",
                    stable.name,
                    candidate.name if candidate else None,
                    pause * 1000.0,
                )
            self.on_swap(event)
        self.report("; ".join(errors) or None)
        return event

    def _resolve(self, ref: RevisionRef, current: Served, errors: list[str]) -> Revision | None:
        """The loaded Revision for ``ref``: reused when already served, else loaded now;
        None (with the error recorded) when it cannot be loaded."""
        for loaded in (current.stable, current.candidate):
            if loaded is not None and loaded.name == ref.revision:
                return loaded
        key = (ref.revision, ref.path)
        waiting = self.failed.waiting(key)
        if waiting is not None:
            errors.append(waiting)
            return None
        started = time.perf_counter()
        try:
            revision = self.loader.load(ref)
        except Exception as error:  # any failure keeps the old revision serving
            message = f"cannot load revision {ref.revision!r}: {error}"
            delay = self.failed.record(key, message)
            log.error("%s; keeping the served revisions (retrying in %.0f s)", message, delay)
            errors.append(message)
            return None
        self.failed.clear(key)
        log.info(
            "loaded revision %s in %.2f s (off the decode path)",
            ref.revision,
            time.perf_counter() - started,
        )
        return revision

    def report(self, error: str | None) -> None:
        """Publish a LoadedReport when what it would say changed, was never sent, or was
        last sent ``report_interval`` ago."""
        served = self.revisions.snapshot()
        roles = served.roles()
        content = (
            roles.get("stable"),
            roles.get("candidate"),
            error,
            self.last_pause_ms,
            self.last_swap_at,
        )
        # Unchanged reports are repeated now and then: a heartbeat with a fresh `updated`.
        fresh = time.monotonic() - self._reported_at < self.report_interval
        if content == self._last_report and fresh:
            return
        report_loaded(
            self.client,
            self.keys,
            LoadedReport(
                server=self.server_id,
                stable=content[0],
                candidate=content[1],
                error=error,
                pause_ms=self.last_pause_ms,
                swapped=self.last_swap_at,
            ),
        )
        self._last_report, self._reported_at = content, time.monotonic()
