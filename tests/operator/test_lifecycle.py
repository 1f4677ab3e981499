"""The operator as a real kopf process against the emulated API: children, phases,
conditions, restarts, failures, suspend, deadlines, hang detection and TTL.

The emulator runs no controllers, so the tests play the Job controller and the
kubelet: they write the Job's status and create the gang's pods in the states a
cluster would put them in, and watch what the operator makes of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.emulator import emulated_cluster
from tests.operator.conftest import Kube, OperatorProcess, now, wait_for
from tests.support import lora_job

KUBERNETES_VERSION = "1.31.0"
NAME = "dog-lora"
SERVER_FIELDS = ("uid", "creationTimestamp", "resourceVersion", "generation")


def document(**spec: Any) -> dict[str, Any]:
    changes = {"resources": {"nodes": 2, "gpusPerNode": 4}} | spec
    return lora_job(**changes)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = [c for c in status.get("conditions", []) if c["type"] == type_]
    assert found, f"no {type_} condition in {status}"
    return dict(found[0])


def start(kube: Kube, namespace: str, **spec: Any) -> dict[str, Any]:
    """Create a job and wait for its first attempt's Job."""
    kube.create_job(document(**spec), namespace)
    return kube.wait_batch_job(f"{NAME}-a0", namespace)


def run_gang(kube: Kube, namespace: str, attempt: int = 0) -> dict[str, Any]:
    kube.job_running(f"{NAME}-a{attempt}", namespace, pods=2)
    return kube.wait_status(
        NAME,
        namespace,
        lambda s: s.get("phase") == "Running" and s.get("attempt", 0) == attempt,
        f"attempt {attempt} running",
    )


@pytest.mark.usefixtures("operator")
def test_a_new_job_gets_every_child_adopted_and_valid(kube: Kube, namespace: str) -> None:
    created = kube.create_job(document(), namespace)
    uid = created["metadata"]["uid"]
    job = kube.wait_batch_job(f"{NAME}-a0", namespace)
    children = [
        kube.client.sanitize_for_serialization(child)
        for child in (
            kube.core.read_namespaced_config_map(f"{NAME}-config", namespace),
            kube.core.read_namespaced_service(f"{NAME}-gang", namespace),
            kube.core.read_namespaced_service_account(f"{NAME}-trainer", namespace),
            kube.rbac.read_namespaced_role(f"{NAME}-trainer", namespace),
            kube.rbac.read_namespaced_role_binding(f"{NAME}-trainer", namespace),
        )
    ] + [job]
    for child in children:
        owners = child["metadata"]["ownerReferences"]
        assert owners == [
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": NAME,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], child["metadata"]["name"]
        assert child["metadata"]["namespace"] == namespace
        for field in SERVER_FIELDS:
            child["metadata"].pop(field, None)
        child.pop("status", None)
        kubernetes_validate.validate(child, KUBERNETES_VERSION, strict=True)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    status = kube.wait_phase(NAME, namespace, "Pending")
    assert condition(status, "Created")["status"] == "True"
    assert status["observedGeneration"] == 1
    assert status["attempt"] == 0
    assert kube.wait_event(namespace, NAME, "Created").type == "Normal"


@pytest.mark.usefixtures("operator")
def test_running_then_succeeded_keeps_what_the_trainer_wrote(kube: Kube, namespace: str) -> None:
    start(kube, namespace)
    status = run_gang(kube, namespace)
    assert condition(status, "Running")["reason"] == "PodsRunning"
    assert status["startTime"]
    kube.wait_event(namespace, NAME, "Started")
    progress = {"step": 40, "totalSteps": 40, "percent": 100, "loss": 0.12, "eta": "0s"}
    checkpoint = {"uri": "s3://bucket/out/checkpoints/step-000040", "step": 40}
    kube.patch_status(NAME, namespace, {"progress": progress, "lastCheckpoint": checkpoint})
    saved = kube.wait_event(namespace, NAME, "CheckpointSaved")
    assert saved.message == "step 40: s3://bucket/out/checkpoints/step-000040"
    kube.job_condition(f"{NAME}-a0", namespace, "Complete")
    status = kube.wait_phase(NAME, namespace, "Succeeded")
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "Running")["status"] == "False"
    assert status["completionTime"]
    assert status["progress"] == progress
    assert status["lastCheckpoint"] == checkpoint
    kube.wait_event(namespace, NAME, "Succeeded")


@pytest.mark.usefixtures("operator")
def test_a_failed_pod_restarts_the_whole_gang_up_to_the_backoff_limit(
    kube: Kube, namespace: str
) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 1})
    run_gang(kube, namespace)
    kube.failed_pod(NAME, 0, 1, namespace, exit_code=1, message="RuntimeError: NCCL timeout")
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    restarted = kube.wait_batch_job(f"{NAME}-a1", namespace)
    status = kube.wait_status(NAME, namespace, lambda s: s.get("attempt") == 1, "attempt 1")
    assert (status["restarts"], status["failedAttempts"]) == (1, 1)
    assert status["phase"] == "Restarting"
    restarting = condition(status, "Restarting")
    assert (restarting["status"], restarting["reason"]) == ("True", "TrainerError")
    assert "NCCL timeout" in restarting["message"]
    wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="attempt 0 deleted")
    event = kube.wait_event(namespace, NAME, "Restarted")
    assert event.type == "Warning"
    assert "TrainerError" in event.message
    assert restarted["spec"]["template"]["metadata"]["labels"]["finetune.dev/attempt"] == "1"

    status = run_gang(kube, namespace, attempt=1)
    assert condition(status, "Restarting")["status"] == "False"
    kube.failed_pod(NAME, 1, 0, namespace, exit_code=1)
    kube.job_condition(f"{NAME}-a1", namespace, "Failed", "BackoffLimitExceeded")
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "BackoffLimitExceeded"
    assert "2 failed attempts" in status["failureMessage"]
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert kube.batch_job(f"{NAME}-a2", namespace) is None
    wait_for(lambda: kube.batch_job(f"{NAME}-a1", namespace) is None, what="attempt 1 deleted")


@pytest.mark.usefixtures("operator")
@pytest.mark.parametrize(
    ("exit_code", "container_reason", "message", "reason"),
    [
        (137, "OOMKilled", "", "OOMKilled"),
        (2, "Error", "spec.data.concepts[0].instanceImages: no images in ./dog", "InvalidInput"),
        (3, "Error", "the loss is NaN at step 12", "NonFiniteLoss"),
        (4, "Error", "s3://bucket/out: S3 refused the request (AccessDenied)", "AccessDenied"),
        (5, "Error", "/var/cache/finetune/step-00000004: no space left", "DiskFull"),
    ],
)
def test_a_permanent_failure_is_not_retried(
    kube: Kube, namespace: str, exit_code: int, container_reason: str, message: str, reason: str
) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 5})
    run_gang(kube, namespace)
    kube.failed_pod(NAME, 0, 0, namespace, exit_code, container_reason, message)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == reason
    assert message in status["failureMessage"]
    assert status.get("restarts", 0) == 0
    assert kube.batch_job(f"{NAME}-a1", namespace) is None
    event = kube.wait_event(namespace, NAME, "Failed")
    assert event.type == "Warning"
    assert reason in event.message


@pytest.mark.usefixtures("operator")
def test_preemption_restarts_without_counting_against_the_backoff_limit(
    kube: Kube, namespace: str
) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 0})
    run_gang(kube, namespace)
    preempted = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]
    kube.failed_pod(NAME, 0, 1, namespace, exit_code=143, conditions=preempted)
    kube.failed_pod(NAME, 0, 0, namespace, exit_code=1, message="gloo: connection closed")
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    kube.wait_batch_job(f"{NAME}-a1", namespace)
    status = kube.wait_status(NAME, namespace, lambda s: s.get("attempt") == 1, "attempt 1")
    assert (status["restarts"], status.get("failedAttempts", 0)) == (1, 0)
    assert condition(status, "Restarting")["reason"] == "Preempted"


@pytest.mark.usefixtures("operator")
def test_suspend_stops_the_gang_and_resume_continues_it(kube: Kube, namespace: str) -> None:
    start(kube, namespace)
    run_gang(kube, namespace)
    kube.patch_spec(NAME, namespace, {"runPolicy": {"suspend": True}})
    wait_for(
        lambda: (kube.batch_job(f"{NAME}-a0", namespace) or {})["spec"].get("suspend"),
        what="the Job suspended",
    )
    status = kube.wait_phase(NAME, namespace, "Suspended")
    assert condition(status, "Suspended")["status"] == "True"
    assert condition(status, "Running")["status"] == "False"
    kube.wait_event(namespace, NAME, "Suspended")
    kube.set_job_status(f"{NAME}-a0", namespace, {"active": 0})  # the Job controller's part

    kube.patch_spec(NAME, namespace, {"runPolicy": {"suspend": False}})
    wait_for(
        lambda: not (kube.batch_job(f"{NAME}-a0", namespace) or {})["spec"].get("suspend"),
        what="the Job resumed",
    )
    kube.wait_event(namespace, NAME, "Resumed")
    status = run_gang(kube, namespace)
    assert condition(status, "Suspended")["status"] == "False"
    assert status.get("restarts", 0) == 0  # the same attempt goes on
    assert kube.batch_job(f"{NAME}-a1", namespace) is None


@pytest.mark.usefixtures("operator")
def test_a_kueue_job_waits_for_admission(kube: Kube, namespace: str) -> None:
    job = start(kube, namespace, runPolicy={"queueName": "gpus"})
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    status = kube.wait_status(
        NAME,
        namespace,
        lambda s: any(c["reason"] == "WaitingForAdmission" for c in s.get("conditions", [])),
        "waiting for admission",
    )
    assert status["phase"] == "Pending"
    assert (kube.batch_job(f"{NAME}-a0", namespace) or {})["spec"]["suspend"] is True
    kube.batch.patch_namespaced_job(f"{NAME}-a0", namespace, {"spec": {"suspend": False}})
    run_gang(kube, namespace)


@pytest.mark.usefixtures("operator")
def test_a_silent_trainer_restarts_the_gang(kube: Kube, namespace: str) -> None:
    start(kube, namespace, runPolicy={"heartbeatTimeoutSeconds": 60})
    kube.patch_status(NAME, namespace, {"progress": {"step": 3, "lastHeartbeat": now(-600)}})
    kube.set_job_status(f"{NAME}-a0", namespace, {"active": 2, "startTime": now(-900)})
    kube.wait_batch_job(f"{NAME}-a1", namespace)
    status = kube.wait_status(NAME, namespace, lambda s: s.get("attempt") == 1, "attempt 1")
    restarting = condition(status, "Restarting")
    assert restarting["reason"] == "HeartbeatTimeout"
    assert "heartbeatTimeoutSeconds 60" in restarting["message"]
    assert status["failedAttempts"] == 1


@pytest.mark.usefixtures("operator")
def test_the_deadline_fails_the_job(kube: Kube, namespace: str) -> None:
    job = start(kube, namespace, runPolicy={"activeDeadlineSeconds": 3600})
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    run_gang(kube, namespace)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "DeadlineExceeded")
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "DeadlineExceeded"
    assert "3600s" in status["failureMessage"]
    assert kube.batch_job(f"{NAME}-a1", namespace) is None


@pytest.mark.usefixtures("operator")
def test_a_finished_job_is_deleted_after_its_ttl(kube: Kube, namespace: str) -> None:
    start(kube, namespace, runPolicy={"ttlSecondsAfterFinished": 1})
    run_gang(kube, namespace)
    kube.job_condition(f"{NAME}-a0", namespace, "Complete")
    kube.wait_phase(NAME, namespace, "Succeeded")
    wait_for(lambda: kube.job(NAME, namespace) is None, what="the job deleted after its TTL")


@pytest.mark.usefixtures("operator")
def test_a_spec_change_after_start_is_ignored_with_a_warning(kube: Kube, namespace: str) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 2})
    run_gang(kube, namespace)
    kube.patch_spec(
        NAME,
        namespace,
        {
            "training": {"learningRate": 0.5},
            "resources": {"nodes": 4},
            "runPolicy": {"backoffLimit": 0},
        },
    )
    event = kube.wait_event(namespace, NAME, "SpecChangeIgnored")
    assert event.type == "Warning"
    assert "spec.resources.nodes" in event.message
    assert "spec.training.learningRate" in event.message
    assert "spec.runPolicy.backoffLimit" not in event.message
    assert kube.wait_status(NAME, namespace, lambda s: s.get("observedGeneration") == 2, "gen 2")
    # A preemption restarts the gang with the spec it was created with...
    preempted = [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    kube.failed_pod(NAME, 0, 0, namespace, exit_code=143, conditions=preempted)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    restarted = kube.wait_batch_job(f"{NAME}-a1", namespace)
    assert restarted["spec"]["completions"] == 2
    job_file = kube.core.read_namespaced_config_map(f"{NAME}-config", namespace).data["job.yaml"]
    assert "learningRate: 0.5" not in job_file
    # ...while the new backoffLimit of 0 (a run-policy knob) applies at once.
    run_gang(kube, namespace, attempt=1)
    kube.failed_pod(NAME, 1, 0, namespace, exit_code=1)
    kube.job_condition(f"{NAME}-a1", namespace, "Failed", "BackoffLimitExceeded")
    assert kube.wait_phase(NAME, namespace, "Failed")["failureReason"] == "BackoffLimitExceeded"


@pytest.mark.usefixtures("operator")
def test_an_invalid_spec_fails_naming_the_field(kube: Kube, namespace: str) -> None:
    kube.create_job(document(training={"learningRate": -1}), namespace)
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "InvalidSpec"
    assert "spec.training.learningRate" in status["failureMessage"]
    assert kube.batch_jobs(namespace) == []
    assert kube.wait_event(namespace, NAME, "InvalidSpec").type == "Warning"


def test_an_operator_restart_makes_no_duplicates(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    start(kube, namespace)
    run_gang(kube, namespace)
    operator.kill()
    kube.create_job(document() | {"metadata": {"name": "while-down"}}, namespace)
    operator.start()
    kube.wait_batch_job("while-down-a0", namespace)
    kube.wait_phase("while-down", namespace, "Pending")
    kube.job_condition(f"{NAME}-a0", namespace, "Complete")
    kube.wait_phase(NAME, namespace, "Succeeded")
    names = sorted(j["metadata"]["name"] for j in kube.batch_jobs(namespace))
    assert names == [f"{NAME}-a0", "while-down-a0"]
    assert len(kube.core.list_namespaced_config_map(namespace).items) == 2
    assert len(kube.core.list_namespaced_service(namespace).items) == 2
    created = [e for e in kube.events(namespace, NAME) if e.reason == "Created"]
    assert len(created) == 1


def test_operator_metrics_and_json_logs(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 3})
    run_gang(kube, namespace)
    kube.failed_pod(NAME, 0, 0, namespace, exit_code=1)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    kube.wait_batch_job(f"{NAME}-a1", namespace)

    def samples() -> dict[str, float] | None:
        lines = [line.rsplit(" ", 1) for line in operator.metrics().splitlines()]
        found = {line[0]: float(line[1]) for line in lines if not line[0].startswith("#")}
        return found if found.get('finetune_operator_jobs{phase="Restarting"}') else None

    lines = wait_for(samples, what="a restarting job in the metrics")
    assert lines['finetune_operator_restarts_total{reason="TrainerError"}'] >= 1
    assert lines["finetune_operator_reconcile_duration_seconds_count"] > 0
    logs = operator.log_lines()
    assert logs
    assert not [line for line in logs if line.get("not_json")]


def test_an_operator_watching_some_namespaces_leaves_the_others_alone(tmp_path: Path) -> None:
    watched, other = "team-watched", "team-other"
    with emulated_cluster() as cluster:  # of its own: the module's operator watches all
        kube = Kube(cluster.url)
        kube.create_job(document(), other)
        # Both namespaces exist before the operator starts, as in a cluster (the
        # emulator's namespace watch reports no new ones).
        kube.core.create_namespaced_config_map(watched, {"metadata": {"name": "placeholder"}})
        scoped = OperatorProcess(cluster, tmp_path, namespaces=[watched])
        scoped.start()
        try:
            kube.create_job(document(), watched)
            kube.wait_batch_job(f"{NAME}-a0", watched)
            kube.wait_phase(NAME, watched, "Pending")
            assert kube.batch_jobs(other) == []
            assert not kube.status(NAME, other)
        finally:
            scoped.stop()
