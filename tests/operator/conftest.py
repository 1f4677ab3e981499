"""The real operator process against the emulated Kubernetes API, and the helpers
tests use to play the parts of the cluster the emulator lacks (the Job
controller's status updates, the kubelet's pods)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pytest

from finetune.trainer.launcher.run import free_port
from tests.emulator import EmulatedCluster, emulated_cluster

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
RECONCILE_SECONDS = 0.3
JOB_TRACKING = "batch.kubernetes.io/job-tracking"  # the Job controller's finalizer on pods
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float = 20.0, what: str = "") -> T:
    """Poll until `check` returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(0.1)


class OperatorProcess:
    """`finetune-operator` as users start it, pointed at the emulator by a kubeconfig."""

    def __init__(
        self,
        cluster: EmulatedCluster,
        folder: Path,
        namespaces: list[str] | None = None,
        pushgateway_url: str = "",
    ) -> None:
        self.namespaces = namespaces or []
        self.pushgateway_url = pushgateway_url
        self.kubeconfig = cluster.write_kubeconfig(folder / "kubeconfig")
        self.log = folder / "operator.log"
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        command = [
            str(Path(sys.executable).parent / "finetune-operator"),
            f"--reconcile-seconds={RECONCILE_SECONDS}",
            f"--metrics-port={self.metrics_port}",
            f"--health-port={self.health_port}",
            *(f"--namespace={namespace}" for namespace in self.namespaces),
            *([f"--pushgateway-url={self.pushgateway_url}"] if self.pushgateway_url else []),
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.healthy, timeout=60, what="the operator's /healthz")

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"the operator exited:\n{self.log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2):
                return True
        except OSError:
            return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when its node dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"message": line, "not_json": True})
        return lines


class Kube:
    """A client of the emulated API, plus the cluster's own actors where tests need them."""

    def __init__(self, url: str) -> None:
        configuration = kubernetes.client.Configuration()
        configuration.host = url
        client = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.client = client

    # --- FineTuneJobs ------------------------------------------------------------

    def create_job(self, document: dict[str, Any], namespace: str) -> dict[str, Any]:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, document)
        created = self.job(document["metadata"]["name"], namespace)
        assert created is not None
        return created

    def job(self, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def status(self, name: str, namespace: str) -> dict[str, Any]:
        job = self.job(name, namespace)
        assert job is not None, f"{namespace}/{name} is gone"
        return dict(job.get("status") or {})

    def wait_status(
        self, name: str, namespace: str, check: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        def matching() -> dict[str, Any] | None:
            status = self.status(name, namespace)
            return status if status and check(status) else None

        return wait_for(matching, what=f"{namespace}/{name}: {what}")

    def hold_status(
        self,
        name: str,
        namespace: str,
        check: Callable[[dict[str, Any]], bool],
        what: str,
        ticks: int = 10,
    ) -> dict[str, Any]:
        """Assert that `check` holds over `ticks` of the operator's reconcile interval."""
        deadline = time.monotonic() + ticks * RECONCILE_SECONDS
        while True:
            status = self.status(name, namespace)
            assert check(status), f"{namespace}/{name} no longer {what}: {status}"
            if time.monotonic() > deadline:
                return status
            time.sleep(RECONCILE_SECONDS / 3)

    def wait_phase(self, name: str, namespace: str, phase: str) -> dict[str, Any]:
        return self.wait_status(name, namespace, lambda s: s.get("phase") == phase, phase)

    def patch_spec(self, name: str, namespace: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
        )

    def patch_status(self, name: str, namespace: str, status: dict[str, Any]) -> None:
        """What the trainer does with its service account."""
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        )

    def events(self, namespace: str, name: str | None = None) -> list[Any]:
        events = self.core.list_namespaced_event(namespace).items
        return [e for e in events if name is None or e.involved_object.name == name]

    def wait_event(self, namespace: str, name: str, reason: str) -> Any:
        def found() -> Any:
            return next((e for e in self.events(namespace, name) if e.reason == reason), None)

        return wait_for(found, what=f"a {reason} event for {namespace}/{name}")

    # --- the Job controller and the kubelet, played by hand ------------------------

    def batch_jobs(self, namespace: str) -> list[dict[str, Any]]:
        items = self.batch.list_namespaced_job(namespace).items
        return [self.client.sanitize_for_serialization(j) for j in items]

    def batch_job(self, name: str, namespace: str) -> dict[str, Any] | None:
        return next((j for j in self.batch_jobs(namespace) if j["metadata"]["name"] == name), None)

    def wait_batch_job(self, name: str, namespace: str) -> dict[str, Any]:
        return wait_for(lambda: self.batch_job(name, namespace), what=f"Job {namespace}/{name}")

    def set_job_status(self, name: str, namespace: str, status: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job_status(name, namespace, {"status": status})

    def job_running(self, name: str, namespace: str, pods: int) -> None:
        self.set_job_status(name, namespace, {"active": pods, "startTime": now()})

    def gang_running(self, job: str, attempt: int, namespace: str, nodes: int) -> list[str]:
        """Every rank's pod scheduled with its container running, and the Job active."""
        names = [self.pod(job, attempt, index, namespace, running()) for index in range(nodes)]
        self.job_running(f"{job}-a{attempt}", namespace, pods=nodes)
        return names

    def set_pod_status(self, name: str, namespace: str, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(name, namespace, {"status": status})

    def job_condition(self, name: str, namespace: str, type_: str, reason: str = "") -> None:
        condition = {"type": type_, "status": "True", "reason": reason, "message": reason}
        self.set_job_status(name, namespace, {"active": 0, "conditions": [condition]})

    def pod(
        self,
        job: str,
        attempt: int,
        index: int,
        namespace: str,
        status: dict[str, Any],
    ) -> str:
        """A pod of the gang in a given state, labelled and owned as the Job controller
        would (its Job must exist)."""
        labels = {
            "finetune.dev/job": job,
            "finetune.dev/attempt": str(attempt),
            "app.kubernetes.io/managed-by": "finetune-operator",
        }
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{job}-a{attempt}-{index}-{uuid.uuid4().hex[:5]}",
                "labels": labels,
                "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                "ownerReferences": [self.pod_owner(f"{job}-a{attempt}", namespace)],
                "finalizers": [JOB_TRACKING],
            },
            "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
            "status": status,
        }
        self.core.create_namespaced_pod(namespace, body)
        return str(body["metadata"]["name"])

    def pod_owner(self, job_name: str, namespace: str) -> dict[str, Any]:
        """The ownerReference the Job controller puts on the pods of Job `job_name`."""
        job = self.batch.read_namespaced_job(job_name, namespace)
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job_name,
            "uid": job.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def job_event(
        self, job_name: str, namespace: str, reason: str, message: str, uid: str | None = None
    ) -> None:
        """A Warning event on Job `job_name` (of `uid`, by default the Job's now), as the
        Job controller records one when the API refuses to create a pod."""
        uid = uid or self.batch.read_namespaced_job(job_name, namespace).metadata.uid
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{job_name}."},
            "involvedObject": {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": job_name,
                "namespace": namespace,
                "uid": uid,
            },
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": "job-controller"},
            "lastTimestamp": now(),
        }
        self.core.create_namespaced_event(namespace, body)

    def terminating(self, pod: str, namespace: str) -> None:
        """`kubectl delete pod`: the Job controller's finalizer keeps it, marked for
        deletion, as a cluster shows a pod in its grace period."""
        self.core.delete_namespaced_pod(pod, namespace)

    def failed_pod(
        self,
        job: str,
        attempt: int,
        index: int,
        namespace: str,
        exit_code: int = 1,
        reason: str = "Error",
        message: str = "",
        conditions: list[dict[str, Any]] | None = None,
    ) -> str:
        status = failed(exit_code, message, reason, conditions)
        return self.pod(job, attempt, index, namespace, status)


def container(state: dict[str, Any], ready: bool = False) -> dict[str, Any]:
    return {
        "name": "trainer",
        "state": state,
        "ready": ready,
        "restartCount": 0,
        "image": "trainer",
        "imageID": "",
    }


def running() -> dict[str, Any]:
    """A pod's status once its trainer container has started."""
    scheduled = {"type": "PodScheduled", "status": "True"}
    return {
        "phase": "Running",
        "conditions": [scheduled],
        "containerStatuses": [container({"running": {"startedAt": now()}}, ready=True)],
    }


def unschedulable(message: str) -> dict[str, Any]:
    """A pod the scheduler cannot place, as `kubectl describe` shows it."""
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
    }
    return {"phase": "Pending", "conditions": [condition]}


def pulling(reason: str, message: str) -> dict[str, Any]:
    """A scheduled pod whose container waits, e.g. for its image."""
    scheduled = {"type": "PodScheduled", "status": "True"}
    waiting = container({"waiting": {"reason": reason, "message": message}})
    return {"phase": "Pending", "conditions": [scheduled], "containerStatuses": [waiting]}


def failed(
    exit_code: int = 1,
    message: str = "",
    reason: str = "Error",
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A pod's status once its trainer container exited with `exit_code`."""
    terminated = {"exitCode": exit_code, "reason": reason, "message": message}
    return {
        "phase": "Failed",
        "conditions": conditions or [],
        "containerStatuses": [container({"terminated": terminated})],
    }


def succeeded() -> dict[str, Any]:
    terminated = {"exitCode": 0, "reason": "Completed"}
    return {"phase": "Succeeded", "containerStatuses": [container({"terminated": terminated})]}


def now(offset_seconds: float = 0) -> str:
    moment = time.time() + offset_seconds
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmulatedCluster]:
    with emulated_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def operator(
    cluster: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster, tmp_path_factory.mktemp("operator"))
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def kube(cluster: EmulatedCluster) -> Kube:
    return Kube(cluster.url)


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A namespace of its own per test: jobs of the same name never meet."""
    return f"t{uuid.uuid4().hex[:8]}"
