"""The operator as a real kopf process against the emulated API: children, phases,
conditions, restarts, failures, suspend, deadlines, hang detection and TTL.

The emulator runs no controllers, so the tests play the Job controller and the
kubelet: they write the Job's status and create the gang's pods in the states a
cluster would put them in, and watch what the operator makes of it, over many
reconcile ticks where a phase must hold.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.emulator import EmulatedCluster, emulated_cluster
from tests.operator.conftest import (
    GROUP,
    PLURAL,
    RECONCILE_SECONDS,
    VERSION,
    Kube,
    OperatorProcess,
    failed,
    now,
    pulling,
    running,
    succeeded,
    unschedulable,
    wait_for,
)
from tests.support import lora_job

KUBERNETES_VERSION = "1.31.0"
NAME = "dog-lora"
SERVER_FIELDS = ("uid", "creationTimestamp", "resourceVersion", "generation")


def document(**spec: Any) -> dict[str, Any]:
    changes = {"resources": {"nodes": 2, "gpusPerNode": 4}} | spec
    return lora_job(**changes)


def events(kube: Kube, namespace: str, reason: str) -> list[Any]:
    return [e for e in kube.events(namespace, NAME) if e.reason == reason]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = [c for c in status.get("conditions", []) if c["type"] == type_]
    assert found, f"no {type_} condition in {status}"
    return dict(found[0])


def reason(status: dict[str, Any], type_: str) -> str | None:
    """The condition's reason, or None while the operator has not written it yet."""
    found = [c for c in status.get("conditions", []) if c["type"] == type_]
    return found[0].get("reason") if found else None


def start(kube: Kube, namespace: str, **spec: Any) -> dict[str, Any]:
    """Create a job and wait for its first attempt's Job."""
    kube.create_job(document(**spec), namespace)
    return kube.wait_batch_job(f"{NAME}-a0", namespace)


def run_gang(kube: Kube, namespace: str, attempt: int = 0) -> dict[str, Any]:
    kube.gang_running(NAME, attempt, namespace, nodes=2)
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
    progress = {"step": 40, "totalSteps": 40, "percent": 100, "loss": 0.12}
    running_only = {"eta": "0s", "etaSeconds": 0, "imagesPerSecond": 3.5}
    checkpoint = {"uri": "s3://bucket/out/checkpoints/step-000040", "step": 40}
    kube.patch_status(
        NAME, namespace, {"progress": progress | running_only, "lastCheckpoint": checkpoint}
    )
    saved = kube.wait_event(namespace, NAME, "CheckpointSaved")
    assert saved.message == "step 40: s3://bucket/out/checkpoints/step-000040"
    kube.job_condition(f"{NAME}-a0", namespace, "Complete")
    status = kube.wait_phase(NAME, namespace, "Succeeded")
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "Running")["status"] == "False"
    assert status["completionTime"]
    # What only a running gang has (kubectl's ETA and Img/s columns) is cleared.
    assert status["progress"] == progress
    assert status["lastCheckpoint"] == checkpoint
    kube.wait_event(namespace, NAME, "Succeeded")


@pytest.mark.usefixtures("operator")
def test_a_failed_pod_restarts_the_whole_gang_up_to_the_backoff_limit(
    kube: Kube, namespace: str
) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 1})
    run_gang(kube, namespace)
    failed = kube.failed_pod(
        NAME, 0, 1, namespace, exit_code=1, message="RuntimeError: NCCL timeout"
    )
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    restarted = kube.wait_batch_job(f"{NAME}-a1", namespace)
    status = kube.wait_status(NAME, namespace, lambda s: s.get("attempt") == 1, "attempt 1")
    assert (status["restarts"], status["failedAttempts"]) == (1, 1)
    restarting = condition(status, "Restarting")
    assert (restarting["status"], restarting["reason"]) == ("True", "TrainerError")
    assert "NCCL timeout" in restarting["message"]
    event = kube.wait_event(namespace, NAME, "Restarted")
    assert event.type == "Warning"
    assert "TrainerError" in event.message
    assert restarted["spec"]["template"]["metadata"]["labels"]["finetune.dev/attempt"] == "1"
    # Restarting holds until the new gang runs; the failed attempt is kept for its logs.
    status = kube.hold_status(
        NAME,
        namespace,
        lambda s: s["phase"] == "Restarting" and condition(s, "Restarting")["status"] == "True",
        "Restarting",
    )
    assert status["lastFailedAttempt"] == {
        "attempt": 0,
        "job": f"{NAME}-a0",
        "pods": [failed],
        "reason": "TrainerError",
    }
    assert kube.batch_job(f"{NAME}-a0", namespace) is not None
    assert kube.core.read_namespaced_pod(failed, namespace).status.phase == "Failed"

    status = run_gang(kube, namespace, attempt=1)
    assert condition(status, "Restarting")["status"] == "False"
    again = kube.failed_pod(NAME, 1, 0, namespace, exit_code=1)
    kube.job_condition(f"{NAME}-a1", namespace, "Failed", "BackoffLimitExceeded")
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "BackoffLimitExceeded"
    assert "2 failed attempts" in status["failureMessage"]
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert kube.batch_job(f"{NAME}-a2", namespace) is None
    # The newest failed attempt is kept in place of the older one.
    assert status["lastFailedAttempt"]["pods"] == [again]
    assert kube.batch_job(f"{NAME}-a1", namespace) is not None
    wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="attempt 0 deleted")


@pytest.mark.usefixtures("operator")
def test_a_job_that_stops_running_shows_no_eta(kube: Kube, namespace: str) -> None:
    start(kube, namespace)
    run_gang(kube, namespace)
    progress = {"step": 7, "totalSteps": 40, "loss": 0.2, "etaSeconds": 7800, "eta": "2h10m"}
    kube.patch_status(NAME, namespace, {"progress": progress | {"imagesPerSecond": 3.5}})
    kube.failed_pod(NAME, 0, 0, namespace, exit_code=3)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    status = kube.wait_status(
        NAME, namespace, lambda s: s["phase"] == "Failed" and "eta" not in s["progress"], "no ETA"
    )
    assert status["progress"] == {"step": 7, "totalSteps": 40, "loss": 0.2}
    # A report the trainer sent late is cleared too.
    kube.patch_status(NAME, namespace, {"progress": {"eta": "2h9m", "etaSeconds": 7740}})
    kube.wait_status(NAME, namespace, lambda s: "eta" not in s["progress"], "no late ETA")


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
    failed = kube.failed_pod(NAME, 0, 0, namespace, exit_code, container_reason, message)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == reason
    assert message in status["failureMessage"]
    assert status.get("restarts", 0) == 0
    assert kube.batch_job(f"{NAME}-a1", namespace) is None
    # The failed rank's pod stays for `kubectl logs`, and status names it.
    assert status["lastFailedAttempt"]["pods"] == [failed]
    assert kube.batch_job(f"{NAME}-a0", namespace) is not None
    assert kube.core.read_namespaced_pod(failed, namespace).status.phase == "Failed"
    event = kube.wait_event(namespace, NAME, "Failed")
    assert event.type == "Warning"
    assert reason in event.message


@pytest.mark.usefixtures("operator")
def test_preemption_restarts_without_counting_against_the_backoff_limit(
    kube: Kube, namespace: str
) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 0})
    pods = kube.gang_running(NAME, 0, namespace, nodes=2)
    kube.wait_phase(NAME, namespace, "Running")
    # The scheduler marks rank 1 for preemption and deletes it. The Job controller counts
    # a deleted pod as failed and lets it go before it marks the Job Failed: by then the
    # victim is gone and only its peer's error is left to read.
    preempted = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    victim = running()
    victim["conditions"].append(preempted)
    kube.set_pod_status(pods[1], namespace, victim)
    wait_for(
        lambda: (
            "finetune.dev/disruption"
            in (
                (kube.batch_job(f"{NAME}-a0", namespace) or {})["metadata"].get("annotations") or {}
            )
        ),
        what="the disruption noted on the attempt's Job",
    )
    kube.core.delete_namespaced_pod(pods[1], namespace)
    kube.set_pod_status(pods[0], namespace, failed(1, "gloo: connection closed"))
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    kube.wait_batch_job(f"{NAME}-a1", namespace)
    status = kube.wait_status(NAME, namespace, lambda s: s.get("attempt") == 1, "attempt 1")
    assert (status["restarts"], status.get("failedAttempts", 0)) == (1, 0)
    assert condition(status, "Restarting")["reason"] == "Preempted"
    assert status["lastFailedAttempt"]["reason"] == "Preempted"
    # Once a later attempt succeeds, the kept one has served its purpose.
    run_gang(kube, namespace, attempt=1)
    kube.job_condition(f"{NAME}-a1", namespace, "Complete")
    status = kube.wait_phase(NAME, namespace, "Succeeded")
    assert "lastFailedAttempt" not in status
    wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="attempt 0 deleted")
    assert kube.batch_job(f"{NAME}-a1", namespace) is not None


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
    kube.hold_status(NAME, namespace, lambda s: s["phase"] == "Suspended", "Suspended")
    assert len(events(kube, namespace, "Suspended")) == 1
    # The trainer's last report, sent as its SIGTERM ends its step, after the tick that
    # left Running: a suspended job shows no ETA or throughput.
    late = {"step": 7, "totalSteps": 40, "eta": "2h9m", "etaSeconds": 7740, "imagesPerSecond": 3.5}
    kube.patch_status(NAME, namespace, {"progress": late})
    status = kube.wait_status(NAME, namespace, lambda s: "eta" not in s["progress"], "no late ETA")
    assert status["progress"] == {"step": 7, "totalSteps": 40}

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
def test_a_gang_waiting_for_gpus_stays_pending_with_the_reason(kube: Kube, namespace: str) -> None:
    start(kube, namespace, runPolicy={"heartbeatTimeoutSeconds": 60})
    no_gpus = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    pods = [kube.pod(NAME, 0, index, namespace, unschedulable(no_gpus)) for index in range(2)]
    # The Job controller counts Pending pods as active; its Job started 15 minutes ago,
    # far longer than the heartbeat timeout.
    kube.set_job_status(f"{NAME}-a0", namespace, {"active": 2, "startTime": now(-900)})
    status = kube.wait_status(
        NAME, namespace, lambda s: reason(s, "Running") == "Unschedulable", "waiting"
    )
    assert no_gpus in condition(status, "Running")["message"]
    status = kube.hold_status(
        NAME,
        namespace,
        lambda s: s["phase"] == "Pending" and s.get("attempt", 0) == 0 and not s.get("startTime"),
        "Pending without restarts",
    )
    assert condition(status, "Running")["status"] == "False"
    (event,) = events(kube, namespace, "Unschedulable")
    assert (event.type, event.message) == ("Warning", f"2 of 2 pods waiting; rank 0: {no_gpus}")
    assert not events(kube, namespace, "Started") + events(kube, namespace, "Restarted")

    # Scheduled, the image cannot be pulled: a new reason, one new event.
    back_off = 'Back-off pulling image "registry.example/trainer:v9"'
    for name in pods:
        kube.set_pod_status(name, namespace, pulling("ImagePullBackOff", back_off))
    kube.wait_event(namespace, NAME, "ImagePullBackOff")
    status = kube.hold_status(NAME, namespace, lambda s: s["phase"] == "Pending", "Pending")
    assert condition(status, "Running")["reason"] == "ImagePullBackOff"
    assert len(events(kube, namespace, "ImagePullBackOff")) == 1
    assert len(events(kube, namespace, "Unschedulable")) == 1

    for name in pods:
        kube.set_pod_status(name, namespace, running())
    status = kube.wait_phase(NAME, namespace, "Running")
    assert condition(status, "Running")["reason"] == "PodsRunning"
    assert status["startTime"]
    kube.wait_event(namespace, NAME, "Started")


@pytest.mark.usefixtures("operator")
def test_pods_the_api_refuses_to_create_are_named_in_the_status(kube: Kube, namespace: str) -> None:
    """A namespace's GPU quota is used up: the Job controller cannot create the pods
    and says so only in events on the Job. The job stays Pending with that reason."""
    start(kube, namespace)
    job = f"{NAME}-a0"
    # An earlier Job of this name was refused for another reason: not this Job's word.
    kube.job_event(job, namespace, "FailedCreate", "Error creating: an old refusal", "old-uid")
    quota = (
        f'Error creating: pods "{job}-0-x7k2p" is forbidden: exceeded quota: gpus, '
        "requested: requests.nvidia.com/gpu=4, used: requests.nvidia.com/gpu=4, "
        "limited: requests.nvidia.com/gpu=4"
    )
    kube.job_event(job, namespace, "FailedCreate", quota)
    status = kube.wait_status(
        NAME, namespace, lambda s: reason(s, "Running") == "FailedCreate", "FailedCreate"
    )
    message = f"2 of 2 pods cannot be created: {quota}"
    assert condition(status, "Running")["message"] == message
    assert status["phase"] == "Pending"
    (event,) = events(kube, namespace, "FailedCreate")
    assert (event.type, event.message) == ("Warning", message)

    # The quota is freed: the pods are created and run.
    run_gang(kube, namespace)
    assert len(events(kube, namespace, "FailedCreate")) == 1


@pytest.mark.usefixtures("operator")
def test_a_gang_never_scheduled_fails_after_the_scheduling_timeout(
    kube: Kube, namespace: str
) -> None:
    start(kube, namespace, runPolicy={"schedulingTimeoutSeconds": 2})
    no_gpus = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    kube.pod(NAME, 0, 0, namespace, running())
    kube.pod(NAME, 0, 1, namespace, unschedulable(no_gpus))
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "SchedulingTimeout"
    assert "runPolicy.schedulingTimeoutSeconds (2s)" in status["failureMessage"]
    assert no_gpus in status["failureMessage"]
    assert "SchedulingTimeout" in kube.wait_event(namespace, NAME, "Failed").message
    # The waiting gang holds GPUs (rank 0 got one): it is torn down.
    wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="attempt 0 deleted")


@pytest.mark.usefixtures("operator")
def test_a_staggered_finish_stays_running_until_every_rank_succeeded(
    kube: Kube, namespace: str
) -> None:
    start(kube, namespace)
    pods = kube.gang_running(NAME, 0, namespace, nodes=2)
    kube.wait_phase(NAME, namespace, "Running")
    # Rank 1 is done; rank 0 still saves and uploads the results.
    kube.set_pod_status(pods[1], namespace, succeeded())
    kube.set_job_status(f"{NAME}-a0", namespace, {"active": 1, "succeeded": 1})
    status = kube.hold_status(
        NAME,
        namespace,
        lambda s: s["phase"] == "Running" and condition(s, "Running")["status"] == "True",
        "Running",
    )
    assert "(1 finished)" in condition(status, "Running")["message"]
    kube.set_pod_status(pods[0], namespace, succeeded())
    kube.job_condition(f"{NAME}-a0", namespace, "Complete")
    kube.wait_phase(NAME, namespace, "Succeeded")


def test_a_hang_after_a_rank_finished_restarts_the_gang(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    start(kube, namespace, runPolicy={"heartbeatTimeoutSeconds": 60})
    pods = kube.gang_running(NAME, 0, namespace, nodes=2)
    kube.wait_phase(NAME, namespace, "Running")
    kube.set_pod_status(pods[1], namespace, succeeded())
    kube.set_job_status(f"{NAME}-a0", namespace, {"active": 1, "succeeded": 1})
    # The operator is down while rank 0 hangs; back 15 minutes later, it finds the
    # gang running since then and the trainer silent for 10 of them.
    operator.kill()
    status = kube.status(NAME, namespace)
    conditions = [
        c | {"lastTransitionTime": now(-900)} if c["type"] == "Running" else c
        for c in status["conditions"]
    ]
    progress = {"step": 3, "lastHeartbeat": now(-600)}
    kube.patch_status(NAME, namespace, {"conditions": conditions, "progress": progress})
    operator.start()
    kube.wait_batch_job(f"{NAME}-a1", namespace)
    status = kube.wait_status(NAME, namespace, lambda s: s.get("attempt") == 1, "attempt 1")
    restarting = condition(status, "Restarting")
    assert restarting["reason"] == "HeartbeatTimeout"
    assert "heartbeatTimeoutSeconds 60" in restarting["message"]
    assert status["failedAttempts"] == 1
    # A hung gang still holds its GPUs: it is torn down, not kept.
    wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="attempt 0 deleted")


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
def test_a_changed_deadline_reaches_the_running_attempt(kube: Kube, namespace: str) -> None:
    """The Job controller enforces the deadline its Job has: a new one must reach it, or
    the job fails at the old one."""
    start(kube, namespace, runPolicy={"activeDeadlineSeconds": 3600})
    run_gang(kube, namespace)

    def deadline() -> Any:
        return (kube.batch_job(f"{NAME}-a0", namespace) or {})["spec"].get("activeDeadlineSeconds")

    kube.patch_spec(NAME, namespace, {"runPolicy": {"activeDeadlineSeconds": 7200}})
    wait_for(lambda: deadline() == 7200, what="the running Job's deadline raised to 7200 s")
    kube.wait_event(namespace, NAME, "RunPolicyUpdated")
    kube.patch_spec(NAME, namespace, {"runPolicy": {"activeDeadlineSeconds": None}})
    wait_for(lambda: deadline() is None, what="the running Job's deadline removed")
    status = kube.hold_status(NAME, namespace, lambda s: s["phase"] == "Running", "Running")
    assert status.get("restarts", 0) == 0  # the same attempt goes on
    assert deadline() is None


@pytest.mark.usefixtures("operator")
def test_a_running_job_deleted_by_its_user_is_gone_within_seconds(
    kube: Kube, namespace: str
) -> None:
    """`kubectl delete ftj` on a running job: kopf's finalizer on it is lifted once the
    reconcile timer stops, which must take seconds, not kopf's default 60 s poll."""
    start(kube, namespace)
    run_gang(kube, namespace)
    for _ in range(3):  # a few ticks, so the deletion meets the timer at some point
        time.sleep(RECONCILE_SECONDS)
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME)
    wait_for(lambda: kube.job(NAME, namespace) is None, timeout=10, what="the deleted job gone")


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
def test_an_invalid_spec_fails_naming_the_field_and_costs_nothing_after(
    kube: Kube, namespace: str, cluster: EmulatedCluster
) -> None:
    kube.create_job(document(training={"learningRate": -1}), namespace)
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "InvalidSpec"
    assert "spec.training.learningRate" in status["failureMessage"]
    assert status["observedGeneration"] == 1
    assert kube.batch_jobs(namespace) == []
    assert kube.wait_event(namespace, NAME, "InvalidSpec").type == "Warning"
    # A job failed for good is left alone: no request in its namespace for 10 ticks.
    requests = cluster.handler.requests_in
    before = requests[namespace]
    time.sleep(10 * RECONCILE_SECONDS)
    assert requests[namespace] == before


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
