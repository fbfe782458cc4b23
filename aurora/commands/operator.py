"""`aurora operator`: run the Kubernetes operator (kopf) that reconciles Speculators."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "operator", help="run the Kubernetes operator for Speculator resources",
        description="Watch aurora.dev/v1alpha1 Speculators and reconcile each into its "
        "servers, trainer, Service, ConfigMap and checkpoint volume; drive the rollout "
        "policy through Redis and report status. Uses the in-cluster ServiceAccount, "
        "else the current kubeconfig context. Runs standalone (no peering) unless --peering: "
        "then several replicas share the work safely, the oldest one reconciling and the "
        "others paused until it stops (kopf peering). Settings from the environment: "
        "AURORA_*_IMAGE, AURORA_MANAGED_REDIS_URL and _PASSWORD, AURORA_REDIS_ALLOWLIST.",
    )  # fmt: skip
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; globs like 'team-*' work)",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch every namespace (the default without --namespace)",
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=8080,
        help="serve GET /healthz on this port for the liveness probe (0: off)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9100,
        help="serve Prometheus metrics on this port (0: off)",
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="coordinate with other operator replicas through this kopf peering "
        "object (needs kopf's peering CRDs, shipped in manifests/base/peering); default: "
        "standalone",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority (the highest reconciles, the others pause); default: older "
        "replicas first, so a restarted replica never takes over from a working one",
    )
    parser.add_argument(
        "--peering-lifetime",
        type=int,
        default=15,
        metavar="SECONDS",
        help="a replica that stopped refreshing its peering record this long ago is dead, "
        "and the next one takes over (default: 15)",
    )
    parser.set_defaults(handler=_operator)  # fmt: skip


def oldest_first_priority(now_ns: int, tiebreak: int) -> int:
    """A peering priority that is higher for a replica started earlier: milliseconds
    since the epoch, negated, with three random digits so that two replicas started in
    the same millisecond never tie (kopf pauses every operator on a tie)."""
    return -((now_ns // 1_000_000) * 1000 + tiebreak % 1000)


def _operator(args: argparse.Namespace) -> int:
    import os
    import secrets
    import time

    import kopf

    from aurora.operator import handlers  # noqa: F401  (registers the handlers)
    from aurora.operator.metrics import OperatorMetrics
    from aurora.operator.settings import OperatorSettings

    metrics = OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    memo = kopf.Memo(
        cluster=None,
        settings=OperatorSettings.from_env(os.environ),
        metrics=metrics,
        redis_clients={},
        peering_lifetime=args.peering_lifetime,
        peering=args.peering,
        # A KopfPeering per watched namespace (not for globs: kopf follows those itself).
        peering_namespaces=[ns for ns in args.namespace if not any(c in ns for c in "*?[")],
    )
    priority = args.priority
    if priority is None and args.peering is not None:
        priority = oldest_first_priority(time.time_ns(), secrets.randbelow(1000))
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=priority,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz"
        if args.liveness_port
        else None,
        memo=memo,
    )
    return 0
