"""The trainer's Prometheus metrics, served on a port in each pod.

One `finetune_` prefix, base units (seconds, bytes), `_total` on counters, and
bounded labels only: job, namespace, method and rank (never a step or a prompt); the
validation scores add metric and concept.
The first process of each pod (local rank 0) serves `/metrics` on
`$FINETUNE_TRAINER_METRICS_PORT` (default 9400, the port the operator's pods name
`metrics`); with `$FINETUNE_PUSHGATEWAY_URL` set, rank 0 also pushes the final
values when training ends, so a job shorter than a scrape interval is still seen.
The `job` and `namespace` labels name the FineTuneJob: scrape with honor_labels
(the chart's PodMonitor does) so Prometheus keeps them rather than its own.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    push_to_gateway,
)

from finetune.api import pod

log = logging.getLogger(__name__)

LABELS = ("job", "namespace", "method", "rank")
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
TRANSFER_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
_USERINFO = re.compile(r"//[^/@\s]*@")


@dataclass(frozen=True)
class Identity:
    job: str
    namespace: str
    method: str
    rank: int

    def labels(self) -> dict[str, str]:
        return {
            "job": self.job,
            "namespace": self.namespace,
            "method": self.method,
            "rank": str(self.rank),
        }


class TrainerMetrics:
    """Every metric of one training process, in a registry of its own."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.registry = CollectorRegistry()
        r, labels = self.registry, LABELS

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, labels, registry=r)

        self.step = gauge("finetune_step", "Optimizer steps done.")
        self.total_steps = gauge("finetune_total_steps", "Steps the job trains for.")
        self.loss = gauge("finetune_loss", "Training loss of the last step (mean over ranks).")
        self.learning_rate = gauge("finetune_learning_rate", "Learning rate of the last step.")
        self.images_per_second = gauge(
            "finetune_images_per_second", "Images per second over the whole gang."
        )
        self.eta = gauge("finetune_eta_seconds", "Estimated seconds until training ends.")
        self.gpu_allocated = gauge(
            "finetune_gpu_memory_allocated_bytes", "GPU memory held by tensors now."
        )
        self.gpu_peak = gauge("finetune_gpu_memory_peak_bytes", "Peak GPU memory held by tensors.")
        self.step_seconds = Histogram(
            "finetune_step_duration_seconds",
            "Time per optimizer step.",
            labels,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.checkpoint_save_seconds = Histogram(
            "finetune_checkpoint_save_duration_seconds",
            "Time to write a checkpoint locally.",
            labels,
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.checkpoint_upload_seconds = Histogram(
            "finetune_checkpoint_upload_duration_seconds",
            "Time to upload a checkpoint's files.",
            labels,
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.checkpoint_bytes = Counter(
            "finetune_checkpoint_bytes_total", "Bytes of checkpoints written.", labels, registry=r
        )
        self.checkpoint_uploaded_bytes = Counter(
            "finetune_checkpoint_uploaded_bytes_total",
            "Bytes of checkpoints uploaded, with the run's record each carries.",
            labels,
            registry=r,
        )
        self.samples = Counter(
            "finetune_samples_generated_total", "Validation images generated.", labels, registry=r
        )
        # Validation scores: one series per metric and concept (`all`, or a Custom
        # Diffusion modifier token); both label sets are bounded by the job's spec.
        self.validation_score = Gauge(
            "finetune_validation_score",
            "Fidelity of the latest validation samples (cosine similarity): metric "
            "clipText, clipImage or dino; concept all, or a modifier token.",
            (*labels, "metric", "concept"),
            registry=r,
        )
        # lcm, lcmLora: the student at each of `validation.distillation.steps` against its
        # teacher; `steps` is bounded by the spec too (at most 8 step counts).
        self.distillation_score = Gauge(
            "finetune_distillation_score",
            "Fidelity of the latest validation's LCM student samples at `steps` denoising "
            "steps (cosine similarity): metric clipText (to the prompt) or clipImage (to the "
            "teacher's image of the same prompt and seed).",
            (*labels, "metric", "steps"),
            registry=r,
        )
        self.validation_step = gauge(
            "finetune_validation_step", "Step of the latest scored validation."
        )
        self.evaluation_seconds = gauge(
            "finetune_validation_evaluation_seconds",
            "Time the latest validation's scoring took (evaluators loaded and freed included).",
        )
        # Series exist from the start (at zero), so a dashboard never shows "no data"
        # for a job that has not checkpointed or sampled yet.
        for metric in (
            self.checkpoint_bytes,
            self.checkpoint_uploaded_bytes,
            self.samples,
            self.step_seconds,
            self.checkpoint_save_seconds,
            self.checkpoint_upload_seconds,
        ):
            metric.labels(**identity.labels())

    def record_step(
        self,
        step: int,
        total_steps: int,
        loss: float,
        learning_rate: float | None,
        images_per_second: float,
        seconds: float,
        eta_seconds: int | None,
        gpu: tuple[int, int] | None = None,
    ) -> None:
        labels = self.identity.labels()
        self.step.labels(**labels).set(step)
        self.total_steps.labels(**labels).set(total_steps)
        self.loss.labels(**labels).set(loss)
        if learning_rate is not None:
            self.learning_rate.labels(**labels).set(learning_rate)
        self.images_per_second.labels(**labels).set(images_per_second)
        self.step_seconds.labels(**labels).observe(seconds)
        if eta_seconds is not None:
            self.eta.labels(**labels).set(eta_seconds)
        if gpu is not None:
            self.gpu_allocated.labels(**labels).set(gpu[0])
            self.gpu_peak.labels(**labels).set(gpu[1])

    def record_position(self, step: int, total_steps: int, loss: float | None) -> None:
        """Where a resumed run stands before it trains (a finished run run again trains
        nothing): the steps done and the loss of the last, so the final push has them."""
        labels = self.identity.labels()
        self.step.labels(**labels).set(step)
        self.total_steps.labels(**labels).set(total_steps)
        if loss is not None:
            self.loss.labels(**labels).set(loss)

    def record_finished(self) -> None:
        """The run is over (its last step, or an early stop): nothing left to wait for and
        nothing training, so the final push and /metrics say so rather than the last
        step's ETA and speed."""
        labels = self.identity.labels()
        self.eta.labels(**labels).set(0)
        self.images_per_second.labels(**labels).set(0)

    def record_validation(
        self,
        step: int,
        figures: list[tuple[str, str, float]],
        seconds: float,
        by_steps: list[tuple[str, int, float]] | None = None,
    ) -> None:
        """`figures`: (metric, concept, value) of one validation; `by_steps`: (metric,
        student steps, value) of an LCM student against its teacher."""
        labels = self.identity.labels()
        for metric, concept, value in figures:
            self.validation_score.labels(**labels, metric=metric, concept=concept).set(value)
        for metric, steps, value in by_steps or []:
            self.distillation_score.labels(**labels, metric=metric, steps=str(steps)).set(value)
        self.validation_step.labels(**labels).set(step)
        self.evaluation_seconds.labels(**labels).set(seconds)

    def record_checkpoint_saved(self, seconds: float, size: int) -> None:
        labels = self.identity.labels()
        self.checkpoint_save_seconds.labels(**labels).observe(seconds)
        self.checkpoint_bytes.labels(**labels).inc(size)

    def record_checkpoint_uploaded(self, seconds: float, size: int) -> None:
        labels = self.identity.labels()
        self.checkpoint_upload_seconds.labels(**labels).observe(seconds)
        self.checkpoint_uploaded_bytes.labels(**labels).inc(size)

    def record_samples(self, count: int) -> None:
        self.samples.labels(**self.identity.labels()).inc(count)

    def serve(self, env: Mapping[str, str] | None = None) -> int | None:
        """Serve /metrics on the configured port, on IPv6 and IPv4 alike; None (and a
        warning) when it is taken."""
        env = os.environ if env is None else env
        port = int(env.get(pod.TRAINER_METRICS_PORT_ENV, pod.TRAINER_METRICS_PORT))
        try:
            _serve(self.registry, port)
        except OSError as exc:
            log.warning("metrics: port %d unavailable (%s); not serving /metrics", port, exc)
            return None
        return port

    def push(self, env: Mapping[str, str] | None = None) -> bool:
        """Push the final values to the Pushgateway, if one is configured; whether they
        went. A failure of any kind is a warning: the run's results are in place by now."""
        env = os.environ if env is None else env
        gateway = env.get(pod.PUSHGATEWAY_URL_ENV)
        if not gateway:
            return False
        grouping = {"namespace": self.identity.namespace, "rank": str(self.identity.rank)}
        try:
            push_to_gateway(
                gateway, job=self.identity.job, registry=self.registry, grouping_key=grouping
            )
        except Exception as exc:  # refused, unreachable or a malformed URL: never the run's end
            log.warning(
                "metrics: cannot push the final values to the Pushgateway at %r (%s: %s); "
                "training is not affected",
                _without_credentials(gateway),
                type(exc).__name__,
                _without_credentials(str(exc)),
            )
            return False
        return True


def start(
    job: str, method: str, rank: int, local_rank: int, env: Mapping[str, str] | None = None
) -> TrainerMetrics:
    """This process's metrics; the first process of a pod serves them."""
    env = os.environ if env is None else env
    namespace = env.get(pod.NAMESPACE_ENV, "default")
    metrics = TrainerMetrics(Identity(job, namespace, method, rank))
    if local_rank == 0:
        metrics.serve(env)
    return metrics


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _DualStackServer(_Server):
    """On `::`, and on IPv4 too (mapped addresses), whatever the node's
    `net.ipv6.bindv6only`: a pod of an IPv6-only, IPv4-only or dual-stack cluster is
    scraped at its pod IP."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every few seconds is not worth a log line


def _serve(registry: CollectorRegistry, port: int) -> None:
    """/metrics of `registry` on `port`, on every address: IPv6 and IPv4, or IPv4 alone
    where the kernel has no IPv6."""
    app = make_wsgi_app(registry)
    try:
        server: WSGIServer = make_server("::", port, app, _DualStackServer, _Quiet)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise  # the port is taken: IPv4 alone would not get it either
        server = make_server("0.0.0.0", port, app, _Server, _Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def _without_credentials(text: str) -> str:
    """`text` with the user and password of any URL in it left out (`http://u:p@gw` ->
    `http://gw`); by pattern, since a URL that cannot be parsed must be named too."""
    return _USERINFO.sub("//", text)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
