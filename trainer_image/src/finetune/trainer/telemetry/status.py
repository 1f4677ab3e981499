"""What the trainer tells Kubernetes: its job's status.

In a pod the operator sets `FINETUNE_JOB_NAME` and `FINETUNE_NAMESPACE`; rank 0
then patches the status subresource of its own FineTuneJob (a JSON merge patch
of the trainer's fields: `status.progress`, with the latest validation scores in
`status.progress.metrics`; `status.lastCheckpoint`, `status.artifacts` and
`status.earlyStop`; built
as the API's own models) from a background thread, so a slow or failing API
server never slows or fails training. Only the standard
library is used: the trainer image needs no Kubernetes client.

Environment (the names are the pod contract's, `finetune.api.pod`):

- `FINETUNE_STATUS_API`: the API server's base URL, e.g. `http://127.0.0.1:8001`
  for `kubectl proxy` or a test server. Default: the in-cluster API,
  `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
- `FINETUNE_SERVICE_ACCOUNT_DIR`: where the service account's `token` and
  `ca.crt` lie (default `/var/run/secrets/kubernetes.io/serviceaccount`). The
  token, when there is one, is sent with every request, read anew each time.
- `FINETUNE_STATUS_INTERVAL`: the least seconds between progress updates (default 5).
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from finetune.api import pod
from finetune.api.job import GROUP, PLURAL, VERSION
from finetune.api.status import (
    MAX_ARTIFACTS,
    Artifact,
    CheckpointRef,
    EarlyStop,
    Progress,
    StatusModel,
    ValidationMetrics,
)
from finetune.trainer.telemetry.pace import Smoothed

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0
MIN_RETRY_DELAY = 1.0  # seconds: even with interval 0, a dead API server is not hammered
# At the end, what is pending (the artifacts, the last progress) is worth waiting for: an
# API server upgrade or a control-plane restart answers 503 for some seconds.
FINAL_FLUSH_SECONDS = 45.0
FINAL_RETRY_DELAY = 0.5  # doubled after each failure, up to the next
MAX_FINAL_RETRY_DELAY = 8.0

# The trainer's fields that must reach the API even if progress updates follow at once.
_URGENT = tuple(field for field in pod.TRAINER_FIELDS if field != "progress")


def _now() -> datetime:
    return datetime.now(UTC)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _wire(model: StatusModel) -> dict[str, Any]:
    """A status model as the patch carries it. Nulls stay: in a merge patch they clear
    what an earlier attempt left."""
    return model.model_dump(by_alias=True, mode="json")


class StatusReporter:
    """Patches the job's status from a background thread; no call ever blocks on the
    API or raises because of it.

    Progress is throttled to one update per `interval` (the newest values win);
    checkpoints and artifacts are queued apart from it, so no progress update can
    replace them, and go out at the thread's next wake-up. What fails in a way a
    retry may fix (no connection, 5xx, 429) is tried again an interval (at least a
    second) later; other answers (403, 404, 422) are not retried. `close` sends what is
    left, retrying such failures until its deadline (`FINAL_FLUSH_SECONDS`).
    """

    def __init__(
        self,
        url: str,
        *,
        service_account_dir: Path = Path(pod.SERVICE_ACCOUNT_DIR),
        interval: float = DEFAULT_INTERVAL,
        request_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _now,
    ) -> None:
        self.url = url
        self.interval = interval
        self._token_file = service_account_dir / "token"
        self._request_timeout = request_timeout
        self._clock = clock
        self._wall_clock = wall_clock
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if url.startswith("https:"):
            handlers.append(
                urllib.request.HTTPSHandler(context=_tls(service_account_dir / "ca.crt"))
            )
        # No HTTP(S)_PROXY: the API server is never reached through the job's egress proxy.
        self._opener = urllib.request.build_opener(*handlers)
        self._loss = Smoothed()
        self._lock = threading.Condition()
        self._progress: dict[str, Any] | None = None  # newest progress not yet sent
        self._last_progress: Progress | None = None
        self._metrics: ValidationMetrics | None = None
        self._urgent: dict[str, Any] = {}
        self._progress_due = 0.0  # clock time the next progress update may go out
        self._retry_due = 0.0  # clock time urgent fields may go out again after a failure
        self._closing = False
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="status-reporter", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StatusReporter | None:
        """A reporter for the job this pod trains, or None outside a pod (no job named,
        or no API server known)."""
        env = os.environ if env is None else env
        name, namespace = env.get(pod.JOB_NAME_ENV), env.get(pod.NAMESPACE_ENV)
        if not name or not namespace:
            return None
        api = env.get(pod.STATUS_API_ENV) or _in_cluster_api(env)
        if not api:
            return None
        path = (
            f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace, safe='')}"
            f"/{PLURAL}/{quote(name, safe='')}/status"
        )
        account = Path(env.get(pod.SERVICE_ACCOUNT_DIR_ENV) or pod.SERVICE_ACCOUNT_DIR)
        return cls(api.rstrip("/") + path, service_account_dir=account, interval=_interval(env))

    # --- what the training loop calls ------------------------------------------

    def progress(
        self,
        step: int,
        total_steps: int,
        loss: float | None,
        images_per_second: float | None,
        eta_seconds: int | None,
    ) -> None:
        """Record the newest step; the thread sends it when the interval allows. Only
        these calls and `heartbeat` (from work that moves: a denoising step) refresh
        `lastHeartbeat`: a stuck loop must look stuck."""
        loss = _finite(loss)
        speed = _finite(images_per_second)
        progress = Progress(
            step=step,
            total_steps=total_steps,
            percent=min(100, 100 * step // total_steps) if total_steps > 0 else 0,
            loss=self._loss.add(loss) if loss is not None else self._loss.value,
            images_per_second=speed if speed is not None and speed >= 0 else None,
            eta_seconds=eta_seconds,
            last_heartbeat=self._wall_clock().astimezone(UTC).replace(microsecond=0),
            metrics=self._metrics,
        )
        with self._lock:
            self._last_progress = progress
            self._progress = _wire(progress)
            self._lock.notify()

    def heartbeat(self) -> None:
        """Long work between two steps goes on (a validation's samples, class images):
        `lastHeartbeat` moves, the rest stays as last reported, so the operator does not
        take a validation longer than `heartbeatTimeoutSeconds` for a hang. Cheap enough
        for every denoising step: the thread sends it when the interval allows."""
        beat = self._wall_clock().astimezone(UTC).replace(microsecond=0)
        with self._lock:
            if self._last_progress is None:  # before the first step: the heartbeat alone
                alone = _wire(Progress(last_heartbeat=beat))
                self._progress = {"lastHeartbeat": alone["lastHeartbeat"]}
            else:
                self._last_progress = self._last_progress.model_copy(
                    update={"last_heartbeat": beat}
                )
                self._progress = _wire(self._last_progress)
            self._lock.notify()

    def metrics(self, metrics: ValidationMetrics) -> None:
        """`status.progress.metrics`, the latest validation's scores: every progress update
        carries them from now on (a merge patch of `progress` would clear them otherwise),
        the first with the last step's values, unchanged heartbeat included."""
        with self._lock:
            self._metrics = metrics
            if self._last_progress is not None:
                self._last_progress = self._last_progress.model_copy(update={"metrics": metrics})
                self._progress = _wire(self._last_progress)
                self._lock.notify()

    def checkpoint(self, uri: str, step: int) -> None:
        """`status.lastCheckpoint`: sent at once."""
        self._queue("lastCheckpoint", _wire(CheckpointRef(uri=uri, step=step)))

    def early_stop(self, stop: EarlyStop) -> None:
        """`status.earlyStop`, the reason the operator gives the job's success: sent at once."""
        self._queue("earlyStop", _wire(stop))

    def artifacts(self, artifacts: list[dict[str, Any]]) -> None:
        """`status.artifacts` (uri, sha256, bytes, kind each): sent at once."""
        listed = [_wire(Artifact.model_validate(a)) for a in artifacts[:MAX_ARTIFACTS]]
        self._queue("artifacts", listed)

    def close(self, timeout: float = FINAL_FLUSH_SECONDS) -> None:
        """Stop the thread and send what is pending, waiting at most `timeout` seconds:
        what fails in a way a retry may fix (an API server restarting answers 503 for a
        while) is tried again with a growing delay until then; giving up is logged."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout)
        delay = FINAL_RETRY_DELAY
        while True:
            with self._lock:
                body = self._take(flush=True)
            if not body:
                return
            remaining = deadline - time.monotonic()
            if remaining > 0 and not self._patch(body, min(remaining, self._request_timeout)):
                return  # sent, or refused in a way no retry fixes (warned)
            if deadline - time.monotonic() <= delay:
                break
            with self._lock:
                self._requeue(body)
            time.sleep(delay)
            delay = min(2 * delay, MAX_FINAL_RETRY_DELAY)
        log.warning(
            "gave up sending the job's final status (%s) to %s after %.0f s; the job's "
            "status lacks it",
            ", ".join(sorted(body)),
            self.url,
            timeout,
        )

    # --- the thread ----------------------------------------------------------------

    def _queue(self, field: str, value: Any) -> None:
        with self._lock:
            self._urgent[field] = value
            self._retry_due = 0.0  # a new value is worth trying at once
            self._lock.notify()

    def _take(self, flush: bool = False) -> dict[str, Any]:
        """What is due now (everything when flushing), taken off the queue. Holds the lock."""
        now = self._clock()
        body: dict[str, Any] = {}
        if self._urgent and (flush or now >= self._retry_due):
            body, self._urgent = self._urgent, {}
        if self._progress is not None and (flush or now >= self._progress_due):
            body["progress"], self._progress = self._progress, None
            self._progress_due = now + self.interval
        return body

    def _wake_in(self) -> float | None:
        """Seconds until something queued falls due; None when nothing is queued."""
        due = [self._retry_due] if self._urgent else []
        if self._progress is not None:
            due.append(self._progress_due)
        return max(0.0, min(due) - self._clock()) if due else None

    def _run(self) -> None:
        while True:
            with self._lock:
                body = self._take()
                while not body and not self._closing:
                    self._lock.wait(self._wake_in())
                    body = self._take()
                if self._closing:
                    # close() sends the rest; put back what this wake-up took.
                    self._requeue(body)
                    return
            self._send(body, self._request_timeout)

    def _requeue(self, body: dict[str, Any]) -> None:
        """Put back what a failed or abandoned send held, unless newer values came.
        Holds the lock."""
        for field in _URGENT:
            if field in body:
                self._urgent.setdefault(field, body[field])
        if "progress" in body and self._progress is None:
            self._progress = body["progress"]

    def _send(self, status: dict[str, Any], timeout: float) -> None:
        if self._patch(status, timeout):
            with self._lock:
                self._requeue(status)
                self._retry_due = self._clock() + max(self.interval, MIN_RETRY_DELAY)

    def _patch(self, status: dict[str, Any], timeout: float) -> bool:
        """Send one merge patch; True when it failed in a way a retry may fix."""
        token = self._token()
        try:
            request = urllib.request.Request(
                self.url,
                data=json.dumps({"status": status}, allow_nan=False).encode(),
                method="PATCH",
                headers={
                    "Content-Type": "application/merge-patch+json",
                    "Accept": "application/json",
                },
            )
            if token:
                request.add_header("Authorization", f"Bearer {token}")
            with self._opener.open(request, timeout=timeout) as response:
                response.read()
            return False
        except urllib.error.HTTPError as exc:
            detail = f"HTTP {exc.code} {exc.reason}: {_excerpt(exc)}"
            self._warn_once(f"HTTP {exc.code}", detail, token)
            return exc.code >= 500 or exc.code == 429
        except urllib.error.URLError as exc:
            reason = exc.reason
            kind = type(reason).__name__ if isinstance(reason, BaseException) else "URLError"
            self._warn_once(kind, str(reason), token)
            return True
        except Exception as exc:  # a timeout, a TLS error: nothing may reach the loop
            self._warn_once(type(exc).__name__, str(exc), token)
            return True

    def _token(self) -> str | None:
        # Read each time: projected service-account tokens are rotated on disk.
        try:
            return self._token_file.read_text().strip() or None
        except OSError:
            return None

    def _warn_once(self, kind: str, detail: str, token: str | None) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        if token:
            detail = detail.replace(token, "<token>")
        detail = " ".join(detail.split())
        log.warning(
            "cannot update the job's status at %s (%s); training goes on, and this "
            "kind of failure is not logged again",
            self.url,
            detail,
        )


def _excerpt(error: urllib.error.HTTPError) -> str:
    """The start of an error response: the API server says there why (RBAC, schema)."""
    try:
        return error.read(300).decode("utf-8", "replace")
    except Exception:
        return ""


def _in_cluster_api(env: Mapping[str, str]) -> str | None:
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"https://{host}:{port}"


def _interval(env: Mapping[str, str]) -> float:
    raw = env.get(pod.STATUS_INTERVAL_ENV)
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        log.warning(
            "%s=%r is not a number of seconds; using %s",
            pod.STATUS_INTERVAL_ENV,
            raw,
            DEFAULT_INTERVAL,
        )
        return DEFAULT_INTERVAL
    return value


def _tls(ca_file: Path) -> ssl.SSLContext:
    """Trust the cluster's CA when mounted, else the system's."""
    if ca_file.is_file():
        try:
            return ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            log.warning("cannot read the cluster CA %s (%s); using the system's CAs", ca_file, exc)
    return ssl.create_default_context()
