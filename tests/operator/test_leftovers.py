"""Objects that are not a job's own, and a status that is not yet what the operator wrote.

Children are named after their FineTuneJob, so a job deleted and created again under
its name meets its predecessor's children until a cluster's garbage collector removes
them; a Job deleted by hand leaves its pods terminating for their grace period; and a
watch can lag behind the operator's own status writes. The emulator has no garbage
collector and no kubelet, so it shows each of these for as long as a test wants.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.emulator import EmulatedCluster
from tests.operator.conftest import (
    GROUP,
    PLURAL,
    RECONCILE_SECONDS,
    VERSION,
    Kube,
    running,
    unschedulable,
    wait_for,
)
from tests.operator.test_lifecycle import NAME, condition, document, reason, run_gang, start


def uid(obj: dict[str, Any] | None) -> str | None:
    return None if obj is None else str(obj["metadata"]["uid"])


def replaced(
    kube: Kube, namespace: str, previous: str | None, attempt: int = 0
) -> dict[str, Any] | None:
    """The attempt's Job, once it is another than the one of uid `previous`."""
    found = kube.batch_job(f"{NAME}-a{attempt}", namespace)
    return found if found is not None and uid(found) != previous else None


def recreate(kube: Kube, namespace: str, **spec: Any) -> None:
    """`kubectl delete` the job, then apply it again at once."""
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME)
    wait_for(lambda: kube.job(NAME, namespace) is None, what="the first job gone")
    kube.create_job(document(**spec), namespace)


def collect_garbage(kube: Kube, namespace: str, jobs: tuple[str, ...] = (f"{NAME}-a0",)) -> None:
    """What the garbage collector does once a FineTuneJob is gone: delete its children.
    Jobs go before their pods, which stay a while longer."""
    kube.core.delete_namespaced_config_map(f"{NAME}-config", namespace)
    kube.core.delete_namespaced_service(f"{NAME}-gang", namespace)
    kube.core.delete_namespaced_service_account(f"{NAME}-trainer", namespace)
    kube.rbac.delete_namespaced_role(f"{NAME}-trainer", namespace)
    kube.rbac.delete_namespaced_role_binding(f"{NAME}-trainer", namespace)
    for job in jobs:
        kube.batch.delete_namespaced_job(job, namespace)


@pytest.mark.usefixtures("operator")
def test_a_job_created_again_under_its_name_waits_for_the_previous_ones_children(
    kube: Kube, namespace: str
) -> None:
    start(kube, namespace)
    run_gang(kube, namespace)
    kube.job_condition(f"{NAME}-a0", namespace, "Complete")
    kube.wait_phase(NAME, namespace, "Succeeded")
    previous = uid(kube.batch_job(f"{NAME}-a0", namespace))
    # Created again with another learning rate while its predecessor's children remain:
    # their Complete Job is not this job's success, their job file not its spec.
    recreate(kube, namespace, training={"learningRate": 0.0042})
    status = kube.wait_status(
        NAME,
        namespace,
        lambda s: reason(s, "Created") == "WaitingForPreviousJob",
        "waiting for the previous job's children",
    )
    created = condition(status, "Created")
    assert created["status"] == "False"
    assert f"the previous FineTuneJob {NAME}'s" in created["message"]
    assert f"ConfigMap {NAME}-config" in created["message"]
    kube.hold_status(NAME, namespace, lambda s: s["phase"] == "Pending", "Pending")
    (event,) = [e for e in kube.events(namespace, NAME) if e.reason == "WaitingForPreviousJob"]
    assert event.type == "Warning"
    assert uid(kube.batch_job(f"{NAME}-a0", namespace)) == previous

    collect_garbage(kube, namespace)
    job = wait_for(lambda: replaced(kube, namespace, previous), what="this job's attempt 0")
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid(kube.job(NAME, namespace))
    job_file = kube.core.read_namespaced_config_map(f"{NAME}-config", namespace).data["job.yaml"]
    assert yaml.safe_load(job_file)["spec"]["training"]["learningRate"] == 0.0042
    status = kube.wait_status(
        NAME, namespace, lambda s: reason(s, "Created") == "ChildrenCreated", "created"
    )
    kube.wait_event(namespace, NAME, "Created")
    # The old gang's pods, still Running, are not this job's: it waits for its own.
    status = kube.hold_status(
        NAME,
        namespace,
        lambda s: s["phase"] == "Pending" and reason(s, "Running") in (None, "CreatingPods"),
        "Pending for its own pods",
    )
    run_gang(kube, namespace)


@pytest.mark.usefixtures("operator")
def test_a_later_attempt_waits_for_the_previous_jobs_job_of_its_name(
    kube: Kube, namespace: str
) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 2})
    run_gang(kube, namespace)
    kube.failed_pod(NAME, 0, 0, namespace, exit_code=1)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    kube.wait_batch_job(f"{NAME}-a1", namespace)
    run_gang(kube, namespace, attempt=1)
    kube.job_condition(f"{NAME}-a1", namespace, "Complete")
    kube.wait_phase(NAME, namespace, "Succeeded")
    previous = uid(kube.batch_job(f"{NAME}-a1", namespace))
    # The garbage collector has removed all but the first job's attempt 1.
    recreate(kube, namespace)
    wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="old attempt 0 gone")
    collect_garbage(kube, namespace, jobs=())
    kube.wait_status(NAME, namespace, lambda s: reason(s, "Created") == "ChildrenCreated", "ok")
    run_gang(kube, namespace)
    kube.failed_pod(NAME, 0, 0, namespace, exit_code=1)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    # Its attempt 1 is not the old, Complete one: it waits for that to go.
    kube.wait_status(NAME, namespace, lambda s: s.get("attempt") == 1, "attempt 1")
    # (It may have waited for the old ConfigMap too, before the collector above came.)
    held = f"the previous FineTuneJob {NAME}'s Job {NAME}-a1"

    def waits_for_the_job() -> list[Any]:
        events = kube.events(namespace, NAME)
        return [e for e in events if e.reason == "WaitingForPreviousJob" and held in e.message]

    wait_for(waits_for_the_job, what="a WaitingForPreviousJob event naming the old Job")
    kube.hold_status(NAME, namespace, lambda s: s["phase"] == "Restarting", "Restarting")
    assert uid(kube.batch_job(f"{NAME}-a1", namespace)) == previous
    kube.batch.delete_namespaced_job(f"{NAME}-a1", namespace)
    wait_for(lambda: replaced(kube, namespace, previous, attempt=1), what="its own attempt 1")
    run_gang(kube, namespace, attempt=1)
    assert len(waits_for_the_job()) == 1  # one event, not one per tick


@pytest.mark.usefixtures("operator")
def test_a_job_failed_by_the_operator_never_gets_its_attempt_back(
    kube: Kube, namespace: str, cluster: EmulatedCluster
) -> None:
    job = start(kube, namespace, runPolicy={"schedulingTimeoutSeconds": 2})
    no_gpus = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    kube.pod(NAME, 0, 0, namespace, running())
    kube.pod(NAME, 0, 1, namespace, unschedulable(no_gpus))
    kube.wait_status(NAME, namespace, lambda s: reason(s, "Running") == "Unschedulable", "waiting")
    # From here the operator's watch of FineTuneJobs lags behind its own writes: the
    # ticks after the one that fails the job still read it Pending, its Job gone.
    lag = 10 * RECONCILE_SECONDS
    cluster.handler.lag(PLURAL, namespace, lag)
    try:
        status = kube.wait_phase(NAME, namespace, "Failed")
        assert status["failureReason"] == "SchedulingTimeout"
        wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="attempt 0 deleted")
        kube.hold_status(
            NAME,
            namespace,
            lambda s: s["phase"] == "Failed" and kube.batch_job(f"{NAME}-a0", namespace) is None,
            "Failed with no attempt running",
            ticks=int(2 * lag / RECONCILE_SECONDS),
        )
    finally:
        cluster.handler.lag(PLURAL, namespace, 0)
    # An attempt running for a finished job (as an older operator's stale tick left one)
    # is deleted: its pods would hold GPUs for nothing.
    job["metadata"] = {key: job["metadata"][key] for key in ("name", "labels", "ownerReferences")}
    job.pop("status", None)
    kube.batch.create_namespaced_job(namespace, job)
    wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="attempt 0 deleted")


@pytest.mark.usefixtures("operator")
def test_a_job_deleted_by_hand_is_created_again_and_its_old_pods_do_not_count(
    kube: Kube, namespace: str
) -> None:
    start(kube, namespace)
    old_pods = kube.gang_running(NAME, 0, namespace, nodes=2)
    kube.wait_phase(NAME, namespace, "Running")
    previous = uid(kube.batch_job(f"{NAME}-a0", namespace))
    # `kubectl delete job`: the Job goes, its pods terminate for their grace period.
    kube.batch.delete_namespaced_job(f"{NAME}-a0", namespace)
    for pod in old_pods:
        kube.terminating(pod, namespace)
    wait_for(lambda: replaced(kube, namespace, previous), what="attempt 0's Job created again")
    event = kube.wait_event(namespace, NAME, "JobRecreated")
    assert event.type == "Warning"
    assert f"Job {NAME}-a0 was deleted" in event.message
    # The old pods, terminating, are no members of the new Job's gang.
    waiting = kube.wait_status(
        NAME, namespace, lambda s: s["phase"] == "Pending", "Pending for the new Job's pods"
    )
    assert condition(waiting, "Running")["reason"] == "CreatingPods"
    kube.hold_status(NAME, namespace, lambda s: s["phase"] == "Pending", "Pending")

    # A rank's pod being deleted (preempted, drained, deleted by hand) no longer runs.
    pods = kube.gang_running(NAME, 0, namespace, nodes=2)
    kube.wait_phase(NAME, namespace, "Running")
    kube.terminating(pods[1], namespace)
    status = kube.wait_status(
        NAME, namespace, lambda s: reason(s, "Running") == "Terminating", "rank 1 terminating"
    )
    assert status["phase"] == "Pending"
    assert f"pod {pods[1]} is being deleted" in condition(status, "Running")["message"]
