"""The kopf handlers: thin glue from Kubernetes events to plain functions (children,
validation, status, events in `aurora.operator`), the cluster (`aurora.operator.kube`)
and the rollout loop (`aurora.runtime.rollout.loop`, Redis). Importing this module registers them with kopf.

- create / update of spec / resume: validate; an invalid spec gets Ready=False
  (InvalidSpec), a Warning Event and no change to children, and is not retried until
  the spec changes (no crash loop); a valid one is server-side applied.
- timer: every `spec.rollout.intervalSeconds` re-observes the children (re-applying
  them when one is missing or scaled by hand, and every RESYNC_SECONDS anyway), runs
  one rollout round through Redis, stores the RolloutState in status (never only in
  annotations: GitOps tools replace those) and turns policy events into Events.
  Redis unreachable: Degraded (RedisUnavailable); nothing served changes.
- delete: owner references let the garbage collector remove the children; with
  `spec.traces.deletionPolicy: Delete` a finalizer first removes the Redis keys (and,
  on the managed Redis, the Speculator's Redis user).

A Speculator whose Redis the operator's settings do not allow (redis_access.py) is
refused like an invalid spec (reason RedisNotAllowed) before any connection is made or
Secret read. Every handler's duration and failures are metrics (metrics.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from aurora.operator import children, events, redis_access, validation
from aurora.operator.kube import ApiException, Cluster, api_message, transient
from aurora.operator.names import selector_text
from aurora.operator.spec import GROUP, PLURAL, VERSION, DeletionPolicy, SpeculatorSpec
from aurora.operator.status import Observation, build_status, merge_patch
from aurora.runtime import protocol
from aurora.runtime.protocol import Keys
from aurora.runtime.rollout import (
    Override,
    RolloutState,
    day_zero,
    gates_day_zero,
    loop,
    measure,
)

FINALIZER = "aurora.dev/cleanup"
TICK_SECONDS = 2.0  # how often each Speculator's timer wakes; rounds follow intervalSeconds
RESYNC_SECONDS = 60.0  # children are re-applied at least this often (drift correction)
DELETE_ATTEMPTS = 5  # then deletion goes on and the Redis keys are left, with a Warning
WRITER_WAIT_ATTEMPTS = 24  # x 5 s for the servers and trainer to stop before keys go

log = logging.getLogger(__name__)

# What kopf itself does with the API for these handlers: watch Speculators, patch their
# metadata (progress annotations, the finalizer) and status, post Events, follow the CRD
# and namespaces; owner references with blockOwnerDeletion need the finalizers subresource.
KOPF_PERMISSIONS = frozenset(
    {
        *((GROUP, PLURAL, verb) for verb in ("get", "list", "watch", "patch")),
        (GROUP, f"{PLURAL}/status", "patch"),
        (GROUP, f"{PLURAL}/finalizers", "update"),
        ("", "events", "create"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        # Peering (`aurora operator --peering`): replicas' keep-alives in the peering object.
        *(("kopf.dev", "clusterkopfpeerings", verb) for verb in ("list", "watch", "patch")),
    }
)


def _plain(value: Any) -> Any:
    """kopf's read-only views as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _write_status(patch: kopf.Patch, status: Mapping[str, Any], observation: Observation) -> None:
    before = _plain(status)
    after = build_status(observation, before, datetime.now(UTC))
    for key, value in merge_patch(before, after).items():
        patch.status[key] = value


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Handler progress and the last-handled spec live in annotations under our prefix;
    # status is ours alone and holds the rollout state.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # Events for warnings; ours are explicit
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.peering.lifetime = memo.get("peering_lifetime") or settings.peering.lifetime
    if memo.get("cluster") is None:
        memo.cluster = Cluster.connect()
    if memo.get("peering") and not settings.peering.standalone:
        scope = [None] if settings.peering.clusterwide else memo.get("peering_namespaces", [])
        for namespace in scope:
            memo.cluster.ensure_peering(memo.peering, namespace)


def _refusal(
    body: Mapping[str, Any], memo: kopf.Memo
) -> tuple[SpeculatorSpec | None, list[str], str]:
    """(the parsed spec, errors, condition reason): an invalid spec, or a Redis the
    operator may not use. The one parse of the spec per handler call."""
    spec, errors = validation.checked_spec(body)
    if spec is None or errors:
        return spec, errors, "InvalidSpec"
    refused = redis_access.refusal(spec, memo.settings.redis)
    return spec, ([refused] if refused else []), validation.REDIS_NOT_ALLOWED


# ---------------------------------------------------------------------- children


def _reconcile_children(
    body: Mapping[str, Any], memo: kopf.Memo, *, force: bool
) -> tuple[list[dict[str, Any]], dict[str, int], str | None]:
    """Apply the desired children when forced, when this generation was not applied yet,
    when a server Deployment is missing or drifted, or every RESYNC_SECONDS; prune
    children the spec no longer wants. Returns (observed server Deployments, expected
    replicas by name, apply error or None). Transient API errors propagate; refusals
    are collected into the error. Status never claims a generation not applied."""
    cluster: Cluster = memo.cluster
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    generation = body["metadata"].get("generation")
    desired = children.desired_children(body, memo.settings)
    expected = {
        child["metadata"]["name"]: child["spec"]["replicas"]
        for child in desired
        if child["kind"] == "Deployment"
        and child["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    }
    servers = cluster.server_deployments(namespace, name)
    observed = {d["metadata"]["name"]: d.get("spec", {}).get("replicas") for d in servers}
    now = time.monotonic()
    drifted = any(observed.get(deployment) != replicas for deployment, replicas in expected.items())
    unapplied = memo.get("applied_generation") != generation
    if not (force or unapplied or drifted or now - memo.get("last_apply", 0.0) >= RESYNC_SECONDS):
        return servers, expected, None
    problems = []
    _provision(memo, body)
    for child in desired:
        try:
            if child["kind"] in children.UNLISTED_KINDS:
                memo.cluster.create(child)  # a Secret: created once, never read back
            else:
                memo.cluster.apply(child)
        except ApiException as error:
            if transient(error):
                raise
            problems.append(f"{child['kind']} {child['metadata']['name']}: {api_message(error)}")
    for kind, stale in children.stale_children(cluster.children(namespace, name), desired):
        log.info("deleting %s %s/%s: the spec no longer wants it", kind, namespace, stale)
        cluster.delete(namespace, kind, stale)
    memo.last_apply, memo.applied_generation = now, generation
    return cluster.server_deployments(namespace, name), expected, "; ".join(problems) or None


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile(
    body: kopf.Body,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Follow the spec: children applied, status for this generation."""
    with memo.metrics.reconciling("reconcile") as outcome:
        generation = int(meta.get("generation") or 0)
        spec, errors, reason = _refusal(body, memo)
        if spec is None or errors:
            outcome.error = reason
            if status.get("observedGeneration") != generation:  # one Event per generation
                kopf.warn(body, reason=reason, message="; ".join(errors)[:1024])
            observation = Observation(generation, spec_errors=errors, spec_error_reason=reason)
            _write_status(patch, status, observation)
            return  # not raised: a bad spec is not retried until it changes
        try:
            servers, expected, apply_error = _reconcile_children(body, memo, force=True)
        except ApiException as error:
            raise kopf.TemporaryError(f"Kubernetes API: {api_message(error)}", delay=15) from error
        if apply_error:
            outcome.error = "ApplyFailed"
            kopf.warn(body, reason="ApplyFailed", message=apply_error[:1024])
        observation = Observation(
            generation,
            expected_servers=expected,
            servers=servers,
            apply_error=apply_error,
            rollout_enabled=spec.rollout.enabled,
            selector=selector_text(body["metadata"]["name"], "server"),
        )
        _write_status(patch, status, observation)


# ----------------------------------------------------------------------- rollout


def _client(memo: kopf.Memo, url: str, password: str | None) -> Any:
    key = (url, password)
    clients = memo.redis_clients  # shared by every Speculator (kopf copies memo shallowly)
    if key not in clients:
        clients[key] = loop.connect(url, password)
    return clients[key]


def _admin(memo: kopf.Memo) -> Any:
    """The managed Redis as its admin: creating and removing Speculators' users."""
    redis = memo.settings.redis
    return _client(memo, redis.managed_url, redis.admin_password)


def _redis(memo: kopf.Memo, spec: SpeculatorSpec, namespace: str, name: str) -> Any:
    """The Speculator's Redis as the Speculator: on the managed Redis its own user (so
    even the operator's rounds touch only its keys), else the password its labelled
    Secret holds. Only for a Speculator `_refusal` let through."""
    access = redis_access.plan(spec, namespace, name, memo.settings.redis)
    password = access.password
    if not access.managed and access.secret_name is not None:
        password = memo.cluster.secret_value(namespace, access.secret_name, access.secret_key)
    return _client(memo, access.url, password)


def _provision(memo: kopf.Memo, body: Mapping[str, Any], *, strict: bool = False) -> None:
    """The Speculator's Redis user on the managed Redis, refreshed (idempotent). Redis
    away: logged, and the next round tries again (strict: raised)."""
    spec = SpeculatorSpec.model_validate(body["spec"])
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    access = redis_access.plan(spec, namespace, name, memo.settings.redis)
    if not access.managed or access.password is None:
        return
    try:
        redis_access.provision(_admin(memo), namespace, name, access.password)
    except loop.REDIS_ERRORS as error:
        if strict:
            raise
        log.warning("%s/%s: cannot create its Redis user yet: %s", namespace, name, error)


@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK_SECONDS, initial_delay=TICK_SECONDS)
def rollout(
    body: kopf.Body,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """One round every spec.rollout.intervalSeconds: children, policy, status."""
    if meta.get("deletionTimestamp"):
        return  # being deleted: nothing to re-apply or roll out
    generation = int(meta.get("generation") or 0)
    spec, errors, reason = _refusal(body, memo)
    if spec is None or errors:
        refused = Observation(generation, spec_errors=errors, spec_error_reason=reason)
        _write_status(patch, status, refused)
        return
    now = time.time()
    if now - memo.get("last_round", 0.0) < spec.rollout.interval_seconds:
        return
    memo.last_round = now
    with memo.metrics.reconciling("rollout") as outcome:
        seen = _round(body, meta, status, patch, memo, spec, generation, now)
        if seen is None:
            outcome.error = "KubernetesUnavailable"
            return
        outcome.error = seen.redis_error and "RedisUnavailable"
        _write_status(patch, status, seen)


def _round(
    body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
    spec: SpeculatorSpec, generation: int, now: float,
) -> Observation | None:  # fmt: skip
    """Children, then the policy through Redis; None when the API server is away."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        servers, expected, apply_error = _reconcile_children(body, memo, force=False)
        pods = memo.cluster.server_pods(namespace, name)
    except ApiException as error:
        log.warning(
            "%s/%s: Kubernetes API unavailable this round: %s", namespace, name, api_message(error)
        )
        return None  # the next round tries again; nothing was changed

    observation = Observation(
        generation, expected_servers=expected, servers=servers, apply_error=apply_error,
        rollout_enabled=spec.rollout.enabled, selector=selector_text(name, "server"),
    )  # fmt: skip
    override, override_error = events.parse_override(meta.get("annotations") or {})
    if override_error:
        kopf.warn(body, reason="InvalidOverride", message=override_error)
        patch.metadata.annotations[events.OVERRIDE_ANNOTATION] = None
    try:
        _provision(memo, body, strict=True)
        client = _redis(memo, spec, namespace, name)
        observation = _rollout_round(
            body, status, memo, client, spec, observation, pods, override, now
        )
    except (*loop.REDIS_ERRORS, LookupError, ApiException) as error:
        if isinstance(error, LookupError):
            problem = f"cannot read the Redis password: {error}"
        elif isinstance(error, ApiException):
            problem = f"cannot read the Redis password Secret: {api_message(error)}"
        else:
            problem = loop.redis_problem(spec.traces.redis_url, error)
        memo.metrics.redis_errors.labels(namespace, name).inc()
        observation = replace(observation, redis_error=problem)
    else:
        if override is not None:
            patch.metadata.annotations[events.OVERRIDE_ANNOTATION] = None  # a one-shot command
    return observation


def _rollout_round(
    body: kopf.Body, status: kopf.Status, memo: kopf.Memo, client: Any, spec: SpeculatorSpec,
    observation: Observation, pods: list[str], override: Override | None, now: float,
) -> Observation:  # fmt: skip
    """Run the policy through Redis (or, with the rollout disabled, only measure) and
    say what was seen; Events for the policy's events. Redis errors propagate."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    keys, policy = Keys(namespace, name), spec.rollout_policy()
    window = memo.get("window")
    if window is None or window.size != loop.window_size(policy):
        window = memo.window = loop.SampleWindow(size=loop.window_size(policy))
    state = _rollout_state(status, body, spec, now)
    if not spec.rollout.enabled:
        window.refresh(client, keys)
        measured = measure(
            window.samples(), state.stable_revision, None, policy, since=state.window_since
        )
        return replace(
            observation, measurement=measured, trace_lag=protocol.trace_lag(client, keys)
        )
    result = loop.run_round(
        client, keys, policy, state, window, now, live_pods=pods, override=override
    )
    for event in result.decision.events:
        kopf.event(
            body,
            type=events.event_type(event.action),
            reason=event.action,
            message=event.reason[:1024],
        )
    if result.problem and not _degraded_with(status, result.problem):
        kopf.warn(body, reason="RolloutBlocked", message=result.problem[:1024])
    memo.metrics.record(namespace, name, result.decision, result.trace_lag)
    return replace(
        observation,
        rollout_state=result.decision.new_state,
        decision=result.decision,
        rollout_error=result.problem,
        trace_lag=result.trace_lag,
    )


def _degraded_with(status: Mapping[str, Any], message: str) -> bool:
    """The Degraded condition already says this (so no Event again)."""
    return any(
        c.get("type") == "Degraded" and c.get("status") == "True" and c.get("message") == message
        for c in status.get("conditions") or []
    )


def _rollout_state(
    status: Mapping[str, Any], body: kopf.Body, spec: SpeculatorSpec, now: float
) -> RolloutState:
    """The rollout state kept in status; a state this version cannot read starts over
    from Idle (with a Warning) rather than stopping every future round. None kept: day 0,
    where a gated model-free day-0 draft starts its canary against plain decoding (with
    its StartCanary Event)."""
    stored = status.get("rollout")
    if not stored:
        if not gates_day_zero(spec.draft.initial, spec.rollout):
            return RolloutState()
        state, _ = day_zero(spec.draft.initial, spec.rollout, now)
        for event in state.history:
            kopf.event(
                body, type=events.event_type(event.action), reason=event.action,
                message=event.reason[:1024],
            )  # fmt: skip
        return state
    try:
        return RolloutState.model_validate(_plain(stored))
    except ValidationError as error:
        kopf.warn(
            body,
            reason="RolloutStateReset",
            message=f"status.rollout unreadable, starting from Idle: {error}"[:1024],
        )
        return RolloutState()


# ---------------------------------------------------------------------- deletion


def _deletes_traces(spec: kopf.Spec, **_: Any) -> bool:
    return (spec.get("traces") or {}).get("deletionPolicy", "Delete") == DeletionPolicy.DELETE


def _cleanup_refusal(body: Mapping[str, Any], memo: kopf.Memo) -> str | None:
    try:
        return validation.redis_refusal(body, memo.settings.redis)
    except ValidationError as error:
        return f"the spec is not valid ({error.error_count()} errors)"


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deletes_traces)
def cleanup(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """Remove the Speculator's Redis keys (traces hold user prompts). The writers go
    first: servers and the trainer would write the keys again, so their Deployments are
    deleted and the keys wait until no pod of this Speculator is left (bounded:
    WRITER_WAIT_ATTEMPTS). The other children go with their owner references. Redis
    away: retried, then deletion goes on with a Warning naming the keys left behind, so
    a lost Redis never blocks deleting a Speculator."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    keys = Keys(namespace, name)
    cluster: Cluster = memo.cluster
    deployments = [
        child["metadata"]["name"]
        for child in cluster.children(namespace, name)
        if child["kind"] == "Deployment"
    ]
    writers = [f"Deployment/{d}" for d in deployments] + [
        f"Pod/{pod}" for pod in cluster.pods(namespace, name)
    ]
    if writers and retry < WRITER_WAIT_ATTEMPTS:
        for deployment in deployments:
            cluster.delete(namespace, "Deployment", deployment)
        raise kopf.TemporaryError(
            f"stopping {', '.join(writers)} before deleting Redis keys {keys.prefix}:* "
            "(they would write them again)",
            delay=5,
        )
    if refused := _cleanup_refusal(body, memo):
        kopf.warn(body, reason="RedisKeysLeft", message=f"Redis keys not deleted: {refused}")
        memo.metrics.forget(namespace, name)
        return  # never connect to a Redis the operator may not use
    try:
        spec = SpeculatorSpec.model_validate(body["spec"])
        access = redis_access.plan(spec, namespace, name, memo.settings.redis)
        if access.managed:  # its own user cannot SCAN: the admin deletes, then the user
            deleted = loop.delete_speculator_keys(_admin(memo), keys)
            redis_access.deprovision(_admin(memo), namespace, name)
        else:
            deleted = loop.delete_speculator_keys(_redis(memo, spec, namespace, name), keys)
    except (*loop.REDIS_ERRORS, LookupError, ValidationError) as error:
        if retry + 1 < WRITER_WAIT_ATTEMPTS + DELETE_ATTEMPTS:
            raise kopf.TemporaryError(
                f"cannot delete Redis keys {keys.prefix}:*: {error}", delay=10
            ) from error
        kopf.warn(
            body,
            reason="RedisKeysLeft",
            message=f"Redis keys {keys.prefix}:* were left behind ({error}); delete them by hand",
        )
    else:
        # kopf.event, not kopf.info: info obeys settings.posting.level (WARNING here)
        # and would never be posted.
        kopf.event(
            body,
            type="Normal",
            reason="RedisKeysDeleted",
            message=f"deleted {deleted} Redis keys under {keys.prefix}:",
        )
    memo.metrics.forget(namespace, name)
