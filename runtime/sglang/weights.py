"""Draft hot swaps into a running SGLang server, and SGLang's per-request metrics.

The swap (``DraftPusher.push``), per SGLang release (``SWAP_PROTOCOLS``):

1. load the revision with ``load_checkpoint`` (sha256, names, shapes, NaN checks) and
   convert it to SGLang's EAGLE-3 names (export.py); a new draft vocabulary, or
   data-parallel replicas (SGLang refuses tensor updates with dp_size > 1), raise
   NeedsRestart before the server is touched;
2. serialize the tensors once per tensor-parallel rank: torch shares CPU tensors
   between processes as file descriptors that the first receiver consumes, so one
   payload shared by every rank fails on rank 1 (SGLang's own Engine does the same);
3. ``POST /pause_generation``. 0.5.23: ``retract`` (SGLang first finishes the batch in
   flight under the overlap scheduler, then sends running requests back to the queue,
   freeing their KV cache so it can be flushed); 0.5.12: ``in_place`` (its flush would
   assert with queued requests);
4. 0.5.23: ``POST /begin_weight_update {"selector": "draft"}``;
5. ``POST /update_weights_from_tensor`` with ``load_format`` = Aurora's draft-only
   loader, ``weight_version`` = the revision; 0.5.23 adds ``selector: "draft"`` and
   ``flush_cache: true``: the prefix cache holds the old draft's KV, which would skew
   the new revision's accept lengths. 0.5.12 hands the tensors to the draft AND the
   target; the loader (``load_draft_only``) loads only the EAGLE-3 draft, after waiting
   for in-flight forwards, and 0.5.12 keeps ``flush_cache: false`` (prefix-cache hits
   keep the old draft's KV until evicted; ``--disable-radix-cache`` avoids that);
6. 0.5.23: ``POST /end_weight_update`` (always after a begin);
7. ``POST /get_weights_by_name`` with ``draft:`` names (served by the plugin's hook) to
   check that the draft now holds the new weights;
8. ``POST /continue_generation`` (always, also after a failure).

Requests that ran across the swap give no stats or traces (plugin.py). A revision that
cannot be swapped in place (NeedsRestart, or a failed swap) is served by restarting
SGLang through serve.py when the watcher may restart; otherwise the
watcher reports why in the LoadedReport.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from aurora.runtime.protocol import (
    Builtin,
    DesiredState,
    Keys,
    LoadedReport,
    ProtocolError,
    RequestStats,
    RevisionRef,
    get_desired,
    get_loaded,
    report_loaded,
)
from aurora.runtime.retry import FailedLoads
from aurora.runtime.sglang import PRIMARY_VERSION
from aurora.runtime.sglang.launcher import (
    DRAFT_LOADER,
    EAGLE3,
    Launch,
    initial_launch,
    is_checkpoint,
    running_launch,
)
from aurora.runtime.sglang.serve import Drafts, Restarter

log = logging.getLogger("aurora.sglang")

# Probes read back after a push: (SGLang parameter name, rows compared).
VERIFY_PROBES = (("model.norm.weight", 1), ("model.fc.weight", 1), ("lm_head.weight", 1))
_PROBE_SOURCE = {"model.norm.weight": "norm.weight", "model.fc.weight": "fc.weight"}


class SwapError(RuntimeError):
    """A revision could not be swapped in; the message says why and what to do."""


class NeedsRestart(SwapError):
    """The running server cannot take the revision in place; a restart can serve it."""


# ------------------------------------------------------------ in SGLang's process


def load_draft_only(model: Any, named_tensors: list[tuple[str, Any]]) -> None:
    """SGLang custom weight loader (``--custom-weight-loader``): load into the EAGLE-3
    draft model only; the target model, which SGLang 0.5.12 also calls, is left alone.

    Waits for the device to finish what is queued before copying: under the overlap
    scheduler the batch launched before the pause may still be running and reading the
    old draft. Refuses (logs, loads nothing) a d2t that differs from the served one:
    SGLang's worker keeps its own copy of the draft vocabulary map from start-up, so a
    new vocabulary needs a restart. Never raises: this runs on the scheduler thread."""
    from aurora.runtime.sglang.export import ARCHITECTURE, VOCAB_MAPS

    if type(model).__name__ != ARCHITECTURE:
        return
    try:
        import torch

        from aurora.runtime.sglang import plugin

        tensors = dict(named_tensors)
        d2t, served = tensors.get("d2t"), getattr(model, "hot_token_id", None)
        if d2t is not None and served is not None:
            target_ids = d2t.to("cpu", torch.int64) + torch.arange(d2t.numel())
            if not torch.equal(target_ids, served.to("cpu", torch.int64)):
                log.error(
                    "aurora: not loading the pushed draft: its vocabulary (d2t) differs from "
                    "the served one; restart with the new --speculative-draft-model-path"
                )
                return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # in-flight forwards finish with the old draft
        model.load_weights([(n, t) for n, t in named_tensors if n not in VOCAB_MAPS])
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the next forward reads the whole new draft
        plugin.note_draft_loaded()
    except Exception:
        log.exception("aurora: loading pushed draft weights failed")


# ------------------------------------------------------------------- the pusher


def _serialize_for_sglang(named_tensors: list[tuple[str, Any]]) -> str:
    from sglang.srt.utils import MultiprocessingSerializer

    return str(MultiprocessingSerializer.serialize(named_tensors, output_str=True))


@dataclass(frozen=True)
class SwapProtocol:
    """How one SGLang release takes new draft weights (see the module doc)."""

    pause_mode: str  # /pause_generation mode
    session: bool  # /begin_weight_update ... /end_weight_update around the load
    selector: bool  # update_weights_from_tensor takes selector="draft"
    flush_cache: bool  # flush the prefix cache (old-draft KV) with the load


SWAP_PROTOCOLS = {
    "0.5.23": SwapProtocol(pause_mode="retract", session=True, selector=True, flush_cache=True),
    "0.5.12": SwapProtocol(pause_mode="in_place", session=False, selector=False, flush_cache=False),
}


@dataclass
class SwapResult:
    revision: str
    pause_ms: float


class DraftPusher:
    """Pushes draft revisions into one SGLang server over HTTP (see the module doc).

    ``client`` is an httpx.Client on the server's base URL; ``serialize`` turns
    [(name, tensor)] into one entry of ``serialized_named_tensors`` (SGLang's
    MultiprocessingSerializer by default) and is called once per tensor-parallel rank;
    ``served_d2t`` is the target-id map of the draft the server runs, when known."""

    def __init__(
        self,
        client: Any,
        *,
        version: str = PRIMARY_VERSION,
        tp_size: int = 1,
        dp_size: int = 1,
        dtype: str = "bfloat16",
        device: str = "cpu",
        served_d2t: Any = None,
        serialize: Callable[[list[tuple[str, Any]]], Any] = _serialize_for_sglang,
        loader: str = DRAFT_LOADER,
    ) -> None:
        self.client, self.protocol = client, SWAP_PROTOCOLS[version]
        self.tp_size, self.dp_size, self.dtype, self.device = tp_size, dp_size, dtype, device
        self.served_d2t, self.serialize, self.loader = served_d2t, serialize, loader

    def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        response = self.client.post(path, json=dict(body))
        try:
            payload = response.json()
        except ValueError:
            payload = {"message": response.text[:300]}
        if response.status_code >= 400 or (
            isinstance(payload, dict) and payload.get("success") is False
        ):
            message = payload.get("message") if isinstance(payload, dict) else payload
            raise SwapError(f"SGLang {path} answered {response.status_code}: {message}")
        return payload

    def _post_after_failure(self, path: str, body: Mapping[str, Any]) -> None:
        try:
            self._post(path, body)
        except Exception as error:  # the first failure is the one to report
            log.error("aurora: %s after a failed swap also failed: %s", path, error)

    def payloads(self, named: list[tuple[str, Any]]) -> list[Any]:
        """``serialized_named_tensors``: one serialization per tensor-parallel rank. Each
        rank deserializes only its own entry, and a CPU tensor travels as a file
        descriptor handed out once, so ranks must not share a payload."""
        return [self.serialize(named) for _ in range(self.tp_size)]

    def push(self, path: str | Path) -> SwapResult:
        """Load, convert, push and verify the revision at ``path``; NeedsRestart when the
        server cannot take it in place, SwapError with the reason otherwise. Decoding
        is paused only around the load."""
        import torch

        from aurora.runtime.checkpoint import load_checkpoint
        from aurora.runtime.sglang.export import DTYPES, draft_config_of, to_sglang

        if self.dp_size > 1:
            raise NeedsRestart(
                f"dp_size {self.dp_size}: SGLang refuses update_weights_from_tensor with "
                "data-parallel replicas"
            )
        tensors, meta = load_checkpoint(path)
        config = draft_config_of(meta)
        converted = to_sglang(tensors, config, DTYPES[self.dtype])
        target_ids = converted["d2t"] + torch.arange(converted["d2t"].numel())
        if self.served_d2t is not None and not torch.equal(target_ids, self.served_d2t):
            raise NeedsRestart(
                f"revision {meta.revision} has another draft vocabulary (d2t) than the served "
                "draft, which SGLang cannot swap in place: export it (`aurora export --to "
                "sglang`) and restart with --speculative-draft-model-path"
            )
        payloads = self.payloads([(n, t.to(self.device)) for n, t in converted.items()])
        started = time.perf_counter()
        self._post("/pause_generation", {"mode": self.protocol.pause_mode})
        try:
            self._load(payloads, meta.revision)
            self.verify(converted, meta.revision)
        except BaseException:
            self._post_after_failure("/continue_generation", {})
            raise
        self._post("/continue_generation", {})
        self.served_d2t = target_ids
        return SwapResult(meta.revision, (time.perf_counter() - started) * 1000.0)

    def _load(self, payloads: list[Any], revision: str) -> None:
        body: dict[str, Any] = {
            "serialized_named_tensors": payloads,
            "load_format": self.loader,
            "flush_cache": self.protocol.flush_cache,
            "abort_all_requests": False,
            "weight_version": revision,
        }
        if self.protocol.selector:
            body["selector"] = "draft"
        if not self.protocol.session:
            self._post("/update_weights_from_tensor", body)
            return
        self._post("/begin_weight_update", {"selector": "draft"})
        try:
            self._post("/update_weights_from_tensor", body)
        except BaseException:
            self._post_after_failure("/end_weight_update", {})
            raise
        self._post("/end_weight_update", {})

    def verify(self, converted: Mapping[str, Any], revision: str) -> None:
        """Read probe weights back from the draft (the plugin's ``draft:`` names) and
        compare them with what was pushed, at the pushed dtype's precision."""
        import torch

        for name, rows in VERIFY_PROBES:
            served = self._post(
                "/get_weights_by_name", {"name": f"draft:{name}", "truncate_size": rows}
            )
            if served is None:
                raise SwapError(
                    f"SGLang returned no draft weight {name!r}: is the Aurora plugin loaded?"
                )
            expected = converted[_PROBE_SOURCE.get(name, name)][:rows].float()
            actual = torch.tensor(served, dtype=torch.float32).reshape(expected.shape)
            if not torch.allclose(actual, expected, rtol=1e-2, atol=1e-3):
                raise SwapError(
                    f"after pushing revision {revision}, draft weight {name} does not hold the "
                    "pushed values (was the server launched with --custom-weight-loader "
                    f"{DRAFT_LOADER}?)"
                )


# ------------------------------------------------------------------ the watcher


class LoadedRevision:
    """The revision this server last reported loaded (cached a few seconds): the label
    the plugin's traces and stats carry."""

    def __init__(
        self, client: redis.Redis, keys: Keys, server: str, role: str, ttl: float = 5.0
    ) -> None:
        self.client, self.keys, self.server, self.role, self.ttl = client, keys, server, role, ttl
        self._value, self._at = "", -float("inf")

    def get(self) -> str:
        if time.monotonic() - self._at >= self.ttl:
            self._at = time.monotonic()
            try:
                report = get_loaded(self.client, self.keys).get(self.server)
            except (redis.RedisError, OSError):
                return self._value
            if report is not None:
                self._value = (
                    (report.candidate if self.role == "canary" else None) or report.stable or ""
                )
        return self._value


def wanted(desired: DesiredState, role: str) -> RevisionRef | None:
    """The revision a server of this role should serve: the canary Deployment serves the
    candidate while there is one, every other server the stable revision."""
    if role == "canary" and desired.candidate is not None:
        return desired.candidate
    return desired.stable


def served_name(ref: RevisionRef) -> str:
    """The revision name a SGLang server serving ``ref`` reports (scratch is served as
    no draft: an untrained head is not worth its cost)."""
    if is_checkpoint(ref):
        return ref.revision
    return Builtin.NGRAM if ref.revision == Builtin.NGRAM else Builtin.NONE


class SGLangRevisionWatcher:
    """Follows ``desired`` in Redis like the torch server's RevisionWatcher, for a
    server that holds one draft: hot-swaps the wanted revision when it can, otherwise
    restarts into it (``restarter``; None: reports why it cannot), and reports what is
    loaded. With no desired revision for its role the server serves ``initial`` (the
    spec's draft.initial). A revision that failed is tried again later (``FailedLoads``:
    10 s, doubling to 300 s) while the desired state still names it."""

    def __init__(
        self,
        pusher: DraftPusher,
        client: redis.Redis,
        keys: Keys,
        server: str,
        role: str,
        *,
        running: Launch,
        initial: Launch | None = None,
        restarter: Restarter | None = None,
        checkpoint_dir: str | None = None,
        poll_interval: float = 2.0,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.pusher, self.client, self.keys, self.server, self.role = (
            pusher,
            client,
            keys,
            server,
            role,
        )
        self.running, self.initial, self.restarter = running, initial, restarter
        self.loaded: str | None = running.revision or None
        self.checkpoint_dir, self.poll_interval, self.ready = (
            checkpoint_dir,
            poll_interval,
            ready,
        )
        self.error: str | None = None
        self.waiting: str | None = None  # a restart waits for a free slot
        self.pause_ms: float | None = None
        self.swapped: float | None = None  # wall clock of the last swap, for rollout timings
        self.failed = FailedLoads()
        self._stop = threading.Event()

    def path_of(self, ref: RevisionRef) -> Path:
        """Where the checkpoint is, resolved (and fetched when it is on no shared volume)
        as the torch server does it."""
        return Drafts("", self.checkpoint_dir, self.client, self.keys).source_of(ref)

    def target(self, desired: DesiredState | None) -> tuple[str | None, RevisionRef | None]:
        """(the revision name this server should report, its ref); (None, None) when
        nothing is asked of it."""
        ref = None if desired is None else wanted(desired, self.role)
        if ref is not None:
            return served_name(ref), ref
        if self.initial is not None and self.restarter is not None:
            return self.initial.revision or None, None
        return None, None

    def poll(self) -> None:
        """Read the desired state once, swap or restart into what this server should
        serve, report."""
        name, ref = self.target(get_desired(self.client, self.keys))
        if name is not None and name != self.loaded:
            key = (name, ref.path if ref is not None else "")
            waiting = self.failed.waiting(key)
            if waiting is not None:
                self.error = waiting
            else:
                self._serve(name, ref, key)
        elif name is not None:
            self.error = self.waiting = None
        canary = self.role == "canary"
        report = LoadedReport(
            server=self.server,
            stable=None if canary else self.loaded,
            candidate=self.loaded if canary else None,
            error=self.error,
            pause_ms=self.pause_ms,
            swapped=self.swapped,
        )
        report_loaded(self.client, self.keys, report)

    def _serve(self, name: str, ref: RevisionRef | None, key: tuple[str, str]) -> None:
        try:
            if ref is None or not is_checkpoint(ref) or self.running.algorithm != EAGLE3:
                raise NeedsRestart(
                    f"SGLang runs {self.running.algorithm or 'without speculation'}, "
                    f"{name!r} needs {'EAGLE3' if ref is not None and is_checkpoint(ref) else 'another launch'}"
                )
            result = self.pusher.push(self.path_of(ref))
            if result.revision != ref.revision:
                raise SwapError(
                    f"checkpoint {self.path_of(ref)} holds revision {result.revision!r}, the "
                    f"desired state names {ref.revision!r}: fix the desired state's path"
                )
        except NeedsRestart as error:
            self._restart(name, ref, key, str(error))
            return
        except Exception as error:  # keep serving the old draft, or restart into the new
            if self.restarter is None:
                self._fail(key, f"cannot swap in revision {name!r}: {error}")
            else:
                self._restart(name, ref, key, f"the swap failed ({error})")
            return
        self.loaded, self.pause_ms, self.error = result.revision, result.pause_ms, None
        self.failed.clear(key)
        self.swapped = time.time()
        log.info(
            "aurora: SGLang serves draft %s (paused %.1f ms)", result.revision, result.pause_ms
        )

    def _fail(self, key: tuple[str, str], error: str) -> None:
        """Report ``error`` and keep serving what is loaded; try again later."""
        self.error = error
        delay = self.failed.record(key, error)
        log.error("aurora: %s (trying again in %.0f s)", error, delay)

    def _restart(self, name: str, ref: RevisionRef | None, key: tuple[str, str], why: str) -> None:
        if self.restarter is None:
            self._fail(
                key,
                f"cannot swap in revision {name!r} in place: {why}; start SGLang through "
                "`python3 -m aurora.runtime.sglang.serve` (the operator does) so it can "
                "restart into it, or restart it with that draft exported",
            )
            return
        try:
            self.restarter.prepare(ref)
        except Exception as error:
            self._fail(key, f"cannot restart into revision {name!r}: {error}")
            return
        if not self.restarter.slots.acquire():
            if self.waiting != name:
                log.info("aurora: %s waits for a restart slot to serve %s", self.server, name)
            self.waiting, self.error = name, None
            return
        self.stop()
        self.restarter.exit(f"serving revision {name} needs a restart: {why}")

    def run(self) -> None:
        while not self._stop.is_set() and not self.ready():
            self._stop.wait(self.poll_interval)
        if self.restarter is not None and not self._stop.is_set():
            try:
                self.restarter.started(self.running)
            except Exception as error:
                log.warning("aurora: could not free the restart slot: %s", error)
        backoff = self.poll_interval
        while not self._stop.is_set():
            try:
                self.poll()
                backoff = self.poll_interval
            except (redis.RedisError, OSError, ProtocolError) as error:
                log.warning("aurora: revision watcher: %s; keeping the served draft", error)
                backoff = min(backoff * 2, 30.0)
            except Exception:  # the watcher is the only way to swap: never let it die
                log.exception("aurora: revision watcher poll failed")
            self._stop.wait(backoff)

    def stop(self) -> None:
        self._stop.set()


def start_watcher(settings: Any, server_args: Any) -> SGLangRevisionWatcher:
    """Start the watcher thread for the plugin (in SGLang's HTTP server process); it
    waits for /health before its first push."""
    import httpx

    from aurora.runtime.protocol import connect
    from aurora.runtime.sglang import installed_version
    from aurora.runtime.sglang.export import ExportError, load_export

    running = running_launch(server_args)
    served = None
    if running.draft_path:
        try:
            served = load_export(running.draft_path)
        except ExportError as error:  # e.g. a SpecForge draft: swaps still work, unchecked
            log.warning("aurora: draft %s is not an Aurora export (%s)", running.draft_path, error)
    host = server_args.host if server_args.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    client = httpx.Client(base_url=f"http://{host}:{server_args.port}", timeout=120.0)

    def ready() -> bool:
        try:
            return client.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    redis_client = connect(settings.redis_url)
    initial = initial_launch(settings.initial) if settings.initial else None
    restarter = None
    if settings.restart and initial is not None:
        restarter = Restarter(settings, redis_client, initial=initial)
    watcher = SGLangRevisionWatcher(
        DraftPusher(
            client,
            version=installed_version() or PRIMARY_VERSION,
            tp_size=int(server_args.tp_size),
            dp_size=int(getattr(server_args, "dp_size", 1) or 1),
            dtype=settings.push_dtype,
            device=settings.push_device,
            served_d2t=served.target_ids() if served else None,
        ),
        redis_client,
        settings.keys,
        settings.server,
        settings.role,
        running=running,
        initial=initial,
        restarter=restarter,
        checkpoint_dir=settings.checkpoint_dir or None,
        ready=ready,
    )
    threading.Thread(target=watcher.run, name="aurora-sglang-watcher", daemon=True).start()
    return watcher


# -------------------------------------------------------- per-request metrics

# Speculative counters in /generate's meta_info, newest name first: 0.5.12+ writes
# spec_num_correct_drafts / spec_num_proposed_drafts (plus the aliases
# spec_accepted_drafts / spec_proposed_drafts); 0.5.3-0.5.10 wrote
# spec_accept_token_num / spec_draft_token_num; 0.5.2 only spec_verify_ct.
ACCEPTED_FIELDS = ("spec_num_correct_drafts", "spec_accepted_drafts", "spec_accept_token_num")
PROPOSED_FIELDS = ("spec_num_proposed_drafts", "spec_proposed_drafts", "spec_draft_token_num")


def _first(meta: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    return next((meta[n] for n in names if meta.get(n) is not None), None)


def request_stats(
    meta_info: Mapping[str, Any],
    *,
    revision: str,
    arm: str,
    server: str,
    ttft_s: float | None = None,
    domain: str = "",
) -> RequestStats:
    """RequestStats from one finished SGLang response's ``meta_info``. The accept length
    counts tokens per verify step including the bonus token: (accepted drafts +
    verify steps) / verify steps from whichever counter name the release wrote, else
    SGLang's ``spec_accept_length``, else completion_tokens / spec_verify_ct (0.5.2),
    1.0 without speculation. Decode speed excludes ``ttft_s`` when the caller measured
    it (streaming), else uses the whole ``e2e_latency``. ``weight_version`` names the
    revision when the pusher set it."""
    tokens = int(meta_info.get("completion_tokens") or 0)
    verify_ct = int(meta_info.get("spec_verify_ct") or 0)
    accepted = _first(meta_info, ACCEPTED_FIELDS)
    if verify_ct and accepted is not None:  # exact, and the torch engine's definition
        accept_length = (int(accepted) + verify_ct) / verify_ct
    elif meta_info.get("spec_accept_length") is not None:
        accept_length = float(meta_info["spec_accept_length"])
    else:
        accept_length = tokens / verify_ct if verify_ct else 1.0
    latency = float(meta_info.get("e2e_latency") or 0.0)
    decode_s = max(latency - (ttft_s or 0.0), 0.0)
    decode_tokens = max(tokens - 1, 0) if ttft_s is not None else tokens
    version = meta_info.get("weight_version")
    return RequestStats(
        revision=version if version and version != "default" else revision,
        arm=arm,  # type: ignore[arg-type]
        server=server,
        decode_tokens_per_s=decode_tokens / decode_s if decode_s > 0 else 0.0,
        accept_length=max(float(accept_length), 1.0),
        new_tokens=tokens,
        verify_steps=verify_ct,
        latency_s=latency,
        domain=domain,
    )
