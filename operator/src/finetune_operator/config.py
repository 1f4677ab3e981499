"""The operator's own settings, from environment variables (the Helm chart sets them)
and the command line (which sets the same variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-dev/trainer:0.1.0"


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
