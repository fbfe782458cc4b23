"""`aurora operator`: run the Kubernetes operator (kopf) that reconciles Speculators."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "operator", help="run the Kubernetes operator for Speculator resources",
        description="Watch aurora.dev/v1alpha1 Speculators and reconcile each into its "
        "servers, trainer, Service, ConfigMap and checkpoint volume; drive the rollout "
        "policy through Redis and report status. Uses the in-cluster ServiceAccount, "
        "else the current kubeconfig context. Runs standalone (no peering) unless --peering.",
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
        "object (needs kopf's peering CRDs); default: standalone",
    )
    parser.set_defaults(handler=_operator)  # fmt: skip


def _operator(args: argparse.Namespace) -> int:
    import os

    import kopf

    from aurora.operator import handlers  # noqa: F401  (registers the handlers)
    from aurora.operator.metrics import OperatorMetrics
    from aurora.operator.settings import Images

    metrics = OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    memo = kopf.Memo(
        cluster=None, images=Images.from_env(os.environ), metrics=metrics, redis_clients={}
    )
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz"
        if args.liveness_port
        else None,
        memo=memo,
    )
    return 0
