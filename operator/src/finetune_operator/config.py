"""The operator's own settings, from environment variables (the Helm chart sets them)
and the command line (which sets the same variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-dev/trainer:0.1.0"


def pushgateway_problem(url: str) -> str | None:
    """What is wrong with a Pushgateway URL, or None. Caught at the operator's start:
    each job's trainer would otherwise find out only at its final push."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number in range)
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http:// or https:// URL with a host"
    if parts.port == 0:
        return f"{url!r} has port 0"
    if parts.username is not None:
        return f"{url!r} holds credentials, which the pushes would not send"
    if parts.query or parts.fragment or any(c.isspace() for c in url):
        return f"{url!r} has a query, a fragment or a space; the metric paths follow it"
    return None


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    # Pull secrets every training pod gets, besides a job's own.
    trainer_pull_secrets: tuple[str, ...] = ()
    # Where training pods push their final metrics; none when empty.
    pushgateway_url: str = ""
    # How often each job is reconciled from the watched Jobs and pods. Reads come
    # from kopf's in-memory indexes, so a short interval costs no API calls.
    reconcile_seconds: float = 5.0
    metrics_port: int = 9090
    health_port: int = 8080

    def __post_init__(self) -> None:
        problem = pushgateway_problem(self.pushgateway_url)
        if problem is not None:
            raise ValueError(
                f"--pushgateway-url (env FINETUNE_PUSHGATEWAY_URL): {problem}; e.g. "
                "http://prometheus-pushgateway.monitoring:9091"
            )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorConfig:
        env = dict(os.environ if env is None else env)
        default = cls()
        return cls(
            trainer_image=env.get("FINETUNE_TRAINER_IMAGE", default.trainer_image),
            image_pull_policy=env.get("FINETUNE_IMAGE_PULL_POLICY", default.image_pull_policy),
            trainer_pull_secrets=tuple(
                name for name in env.get("FINETUNE_TRAINER_PULL_SECRETS", "").split(",") if name
            ),
            pushgateway_url=env.get("FINETUNE_PUSHGATEWAY_URL", default.pushgateway_url),
            reconcile_seconds=float(
                env.get("FINETUNE_RECONCILE_SECONDS", default.reconcile_seconds)
            ),
            metrics_port=int(env.get("FINETUNE_METRICS_PORT", default.metrics_port)),
            health_port=int(env.get("FINETUNE_HEALTH_PORT", default.health_port)),
        )
