"""`finetune-operator`: run the operator.

    finetune-operator                      # all namespaces
    finetune-operator -n ml -n research    # only these

Every option has an environment variable (the Helm chart sets those); an option
given on the command line wins.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import kopf

from .config import OperatorConfig
from .connection import PROBE_SECONDS, ClusterUnreachable, connect


def namespaces_of(args: argparse.Namespace) -> list[str]:
    """`-n` given on the command line replaces `$FINETUNE_NAMESPACES`, never adds to it."""
    if args.namespace:
        return list(args.namespace)
    return [n for n in os.environ.get("FINETUNE_NAMESPACES", "").split(",") if n]


def build_parser() -> argparse.ArgumentParser:
    default = OperatorConfig.from_env()
    parser = argparse.ArgumentParser(
        prog="finetune-operator",
        description="Watch FineTuneJobs and run them as DeepSpeed pod gangs.",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        help="watch this namespace (repeatable; env FINETUNE_NAMESPACES, comma-separated); "
        "all namespaces when none is given",
    )
    parser.add_argument(
        "--trainer-image",
        default=default.trainer_image,
        help="image of the training pods when a job sets none (env FINETUNE_TRAINER_IMAGE)",
    )
    parser.add_argument(
        "--pushgateway-url",
        default=default.pushgateway_url,
        help="Pushgateway the training pods push their final metrics to "
        "(env FINETUNE_PUSHGATEWAY_URL)",
    )
    parser.add_argument(
        "--reconcile-seconds",
        type=float,
        default=default.reconcile_seconds,
        help="how often each job is reconciled (env FINETUNE_RECONCILE_SECONDS)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=default.metrics_port,
        help="port of the operator's /metrics (env FINETUNE_METRICS_PORT)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=default.health_port,
        help="port of /healthz for probes (env FINETUNE_HEALTH_PORT)",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "plain"),
        default=os.environ.get("FINETUNE_LOG_FORMAT", "json"),
        help="log lines as JSON objects (default) or plain text (env FINETUNE_LOG_FORMAT)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # The handlers read their configuration when imported.
        os.environ.update(
            FINETUNE_TRAINER_IMAGE=args.trainer_image,
            FINETUNE_PUSHGATEWAY_URL=args.pushgateway_url,
            FINETUNE_RECONCILE_SECONDS=str(args.reconcile_seconds),
            FINETUNE_METRICS_PORT=str(args.metrics_port),
            FINETUNE_HEALTH_PORT=str(args.health_port),
        )
        OperatorConfig.from_env()  # a bad setting stops it now, not each job later
    except ValueError as exc:
        print(f"finetune-operator: {exc}", file=sys.stderr)
        return 2
    try:
        connect(probe_seconds=PROBE_SECONDS)
    except ClusterUnreachable as exc:
        print(f"finetune-operator: no Kubernetes cluster: {exc}", file=sys.stderr)
        return 1
    log_format = kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=log_format)
    from . import handlers  # noqa: F401  (registers the handlers)

    namespaces = namespaces_of(args)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
