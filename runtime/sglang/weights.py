"""Draft hot swaps into a running SGLang server, and SGLang's per-request metrics.

The swap, against SGLang 0.5.12's HTTP API (no ``selector`` and no begin/end weight
update there yet):

1. load the revision with ``load_checkpoint`` (sha256, names, shapes, NaN checks) and
   convert it to SGLang's EAGLE-3 names (export.py);
2. ``POST /pause_generation {"mode": "in_place"}``: the scheduler stops decoding but
   keeps every running request and its KV cache (this is 0.5.12's "begin");
3. ``POST /update_weights_from_tensor`` with ``load_format`` = Aurora's draft-only
   loader and ``flush_cache: false``. 0.5.12 hands the tensors to the draft AND the
   target model; the loader (``load_draft_only``, registered by the launcher with
   ``--custom-weight-loader``) loads them into the EAGLE-3 draft and ignores the target.
   Without it the target's ``lm_head.weight`` would be overwritten;
4. ``POST /get_weights_by_name`` with ``draft:`` names (served by the plugin's hook)
   to check that the draft now holds the new weights;
5. ``POST /continue_generation`` (always, also after a failure: the "end").

Fallback, when a swap cannot be done in place (the draft vocabulary changed, SGLang
answers an error, the weights do not verify): ``aurora export --to sglang`` the
revision and restart the server with ``--speculative-draft-model-path`` pointing at
it; the watcher reports the error in the LoadedReport so the operator sees it.
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
    BUILTIN_REVISIONS,
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
from aurora.runtime.server.revisions import RevisionLoader

log = logging.getLogger("aurora.sglang")

# Probes read back after a push: (SGLang parameter name, rows compared).
VERIFY_PROBES = (("model.norm.weight", 1), ("model.fc.weight", 1), ("lm_head.weight", 1))
_PROBE_SOURCE = {"model.norm.weight": "norm.weight", "model.fc.weight": "fc.weight"}


class SwapError(RuntimeError):
    """A revision could not be swapped in; the message says why and what to do."""


# ------------------------------------------------------------ in SGLang's process


def load_draft_only(model: Any, named_tensors: list[tuple[str, Any]]) -> None:
    """SGLang custom weight loader (``--custom-weight-loader``): load into the EAGLE-3
    draft model only; the target model, which SGLang 0.5.12 also calls, is left alone.

    Refuses (logs, loads nothing) a d2t that differs from the served one: SGLang's
    worker keeps its own copy of the draft vocabulary map from start-up, so a new
    vocabulary needs a restart. Never raises: this runs on the scheduler thread."""
    from aurora.runtime.sglang.export import ARCHITECTURE, VOCAB_MAPS

    if type(model).__name__ != ARCHITECTURE:
        return
    try:
        import torch

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
        model.load_weights([(n, t) for n, t in named_tensors if n not in VOCAB_MAPS])
    except Exception:
        log.exception("aurora: loading pushed draft weights failed")


# ------------------------------------------------------------------- the pusher


def _serialize_for_sglang(named_tensors: list[tuple[str, Any]]) -> str:
    from sglang.srt.utils import MultiprocessingSerializer

    return str(MultiprocessingSerializer.serialize(named_tensors, output_str=True))


@dataclass
class SwapResult:
    revision: str
    pause_ms: float


class DraftPusher:
    """Pushes draft revisions into one SGLang server over HTTP (see the module doc).

    ``client`` is an httpx.Client on the server's base URL; ``serialize`` turns
    [(name, tensor)] into what ``serialized_named_tensors`` carries (SGLang's
    MultiprocessingSerializer by default); ``served_d2t`` is the target-id map of the
    draft the server started with, when known."""

    def __init__(
        self,
        client: Any,
        *,
        tp_size: int = 1,
        dtype: str = "bfloat16",
        device: str = "cpu",
        served_d2t: Any = None,
        serialize: Callable[[list[tuple[str, Any]]], Any] = _serialize_for_sglang,
        loader: str = "aurora.runtime.sglang.weights.load_draft_only",
    ) -> None:
        self.client, self.tp_size, self.dtype, self.device = client, tp_size, dtype, device
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

    def push(self, path: str | Path) -> SwapResult:
        """Load, convert, push and verify the revision at ``path``; SwapError with the
        reason and the fallback otherwise. Decoding is paused only around the push."""
        import torch

        from aurora.runtime.checkpoint import load_checkpoint
        from aurora.runtime.sglang.export import DTYPES, draft_config_of, to_sglang

        tensors, meta = load_checkpoint(path)
        config = draft_config_of(meta)
        converted = to_sglang(tensors, config, DTYPES[self.dtype])
        target_ids = converted["d2t"] + torch.arange(converted["d2t"].numel())
        if self.served_d2t is not None and not torch.equal(target_ids, self.served_d2t):
            raise SwapError(
                f"revision {meta.revision} has another draft vocabulary (d2t) than the served "
                "draft, which SGLang cannot swap in place: export it (`aurora export --to "
                "sglang`) and restart with --speculative-draft-model-path"
            )
        named = [(n, t.to(self.device)) for n, t in converted.items()]
        payload = self.serialize(named)
        started = time.perf_counter()
        self._post("/pause_generation", {"mode": "in_place"})
        try:
            self._post(
                "/update_weights_from_tensor",
                {
                    "serialized_named_tensors": [payload] * self.tp_size,
                    "load_format": self.loader,
                    "flush_cache": False,  # the target's KV cache stays valid
                    "abort_all_requests": False,
                    "weight_version": meta.revision,
                },
            )
            self.verify(converted, meta.revision)
        finally:
            self._post("/continue_generation", {})
        self.served_d2t = target_ids
        return SwapResult(meta.revision, (time.perf_counter() - started) * 1000.0)

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
                    "aurora.runtime.sglang.weights.load_draft_only?)"
                )


# ------------------------------------------------------------------ the watcher


def _no_builtin(name: Any) -> Any:
    raise SwapError(
        f"{name!r}: SGLang serves the one draft it was launched with or pushed; "
        "revisions without a checkpoint (ngram, none, scratch) need a restart"
    )


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


class SGLangRevisionWatcher:
    """Follows ``desired`` in Redis like the torch server's RevisionWatcher, for a
    server that holds one draft: pushes the wanted revision and reports what is loaded.
    A revision that failed is not retried until the desired state names another."""

    def __init__(
        self,
        pusher: DraftPusher,
        client: redis.Redis,
        keys: Keys,
        server: str,
        role: str,
        *,
        loaded: str | None = None,
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
        self.loaded, self.checkpoint_dir, self.poll_interval, self.ready = (
            loaded,
            checkpoint_dir,
            poll_interval,
            ready,
        )
        self.error: str | None = None
        self.pause_ms: float | None = None
        self.swapped: float | None = None  # wall clock of the last swap, for rollout timings
        self.failed: dict[tuple[str, str], str] = {}
        self._stop = threading.Event()

    def path_of(self, ref: RevisionRef) -> Path:
        """Where the checkpoint is, resolved as the torch server resolves it."""
        return RevisionLoader(_no_builtin, _no_builtin, self.checkpoint_dir).path_of(ref)

    def poll(self) -> None:
        """Read the desired state once, push what this server should serve, report."""
        desired = get_desired(self.client, self.keys)
        ref = None if desired is None else wanted(desired, self.role)
        if (
            ref is not None
            and ref.revision in BUILTIN_REVISIONS
            and not ref.path
            and self.loaded is None
        ):
            self.loaded = ref.revision  # launched that way (e.g. NGRAM): nothing to push
        if ref is not None and ref.revision != self.loaded:
            key = (ref.revision, ref.path)
            if key in self.failed:
                self.error = self.failed[key]
            else:
                try:
                    if ref.revision in BUILTIN_REVISIONS and not ref.path:
                        _no_builtin(ref.revision)
                    result = self.pusher.push(self.path_of(ref))
                    if result.revision != ref.revision:
                        raise SwapError(
                            f"checkpoint {self.path_of(ref)} holds revision {result.revision!r}, the "
                            f"desired state names {ref.revision!r}: fix the desired state's path"
                        )
                    self.loaded, self.pause_ms, self.error = result.revision, result.pause_ms, None
                    self.swapped = time.time()
                    log.info(
                        "aurora: SGLang serves draft %s (paused %.1f ms)",
                        result.revision,
                        result.pause_ms,
                    )
                except Exception as error:  # keep serving the old draft, say why
                    self.error = self.failed[key] = (
                        f"cannot swap in revision {ref.revision!r}: {error}"
                    )
                    log.error("aurora: %s", self.error)
        elif ref is not None:
            self.error = None
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

    def run(self) -> None:
        while not self._stop.is_set() and not self.ready():
            self._stop.wait(self.poll_interval)
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


def start_watcher(
    settings: Any, base_url: str, draft_path: str | None, tp_size: int
) -> SGLangRevisionWatcher:
    """Start the watcher thread for the plugin (in SGLang's HTTP server process); it
    waits for /health before its first push."""
    import os

    import httpx

    from aurora.runtime.protocol import connect
    from aurora.runtime.sglang.export import ExportError, load_export

    served = None
    if draft_path:
        try:
            served = load_export(draft_path)
        except ExportError as error:  # e.g. a SpecForge draft: swaps still work, unchecked
            log.warning("aurora: initial draft %s is not an Aurora export (%s)", draft_path, error)
    client = httpx.Client(base_url=base_url, timeout=120.0)

    def ready() -> bool:
        try:
            return client.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    watcher = SGLangRevisionWatcher(
        DraftPusher(
            client,
            tp_size=tp_size,
            dtype=os.environ.get("AURORA_SGLANG_PUSH_DTYPE", "bfloat16"),
            device=os.environ.get("AURORA_SGLANG_PUSH_DEVICE", "cpu"),
            served_d2t=served.target_ids() if served else None,
        ),
        connect(settings.redis_url),
        settings.keys,
        settings.server,
        settings.role,
        loaded=served.revision if served else None,
        checkpoint_dir=os.environ.get("AURORA_CHECKPOINT_DIR"),
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
