"""The API refusing what the operator writes: a job keeps being reconciled, or fails
with the API's word, and never freezes silently.

The emulator refuses chosen requests (`refuse`), as a real API server's validation,
admission or conflict checks do.
"""

from __future__ import annotations

from typing import Any

import kmock
import kubernetes
import pytest
import yaml

from tests.emulator import EmulatedCluster
from tests.operator.conftest import PLURAL, Kube, OperatorProcess, wait_for
from tests.operator.test_lifecycle import NAME, condition, document, reason, run_gang, start


@pytest.mark.usefixtures("operator")
def test_a_refused_status_write_does_not_stop_the_reconciling(
    kube: Kube, namespace: str, cluster: EmulatedCluster
) -> None:
    start(kube, namespace)
    kube.wait_phase(NAME, namespace, "Pending")
    # The operator's next status write (Running) is refused once, as a conflict or an
    # admission webhook may: the job goes on being reconciled all the same.
    cluster.handler.refuse(
        kmock.action.UPDATE, PLURAL, namespace, 422, "refused", subresource="status"
    )
    run_gang(kube, namespace)
    kube.job_condition(f"{NAME}-a0", namespace, "Complete")
    kube.wait_phase(NAME, namespace, "Succeeded")


AFFINITY_REFUSED = (
    'Job.batch "dog-lora-a{attempt}" is invalid: spec.template.spec.affinity.nodeAffinity.'
    "requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0]"
    '.operator: Invalid value: "Within": not a valid selector operator'
)


def refuse_jobs(cluster: EmulatedCluster, namespace: str, attempt: int) -> None:
    """The API refuses the next Job created in `namespace`, naming the field."""
    message = AFFINITY_REFUSED.format(attempt=attempt)
    cluster.handler.refuse(kmock.action.CREATE, "jobs", namespace, 422, message)


@pytest.mark.usefixtures("operator")
def test_a_job_the_api_refuses_fails_the_job_naming_the_field(
    kube: Kube, namespace: str, cluster: EmulatedCluster
) -> None:
    refuse_jobs(cluster, namespace, attempt=0)
    kube.create_job(document(), namespace)
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "Rejected"
    assert "the API refused Job dog-lora-a0" in status["failureMessage"]
    assert "spec.template.spec.affinity.nodeAffinity" in status["failureMessage"]
    assert condition(status, "Failed")["reason"] == "Rejected"
    event = kube.wait_event(namespace, NAME, "Rejected")
    assert event.type == "Warning"
    assert "spec.template.spec.affinity.nodeAffinity" in event.message
    assert kube.batch_job(f"{NAME}-a0", namespace) is None


@pytest.mark.usefixtures("operator")
def test_a_new_attempt_the_api_refuses_fails_the_job(
    kube: Kube, namespace: str, cluster: EmulatedCluster
) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 2})
    run_gang(kube, namespace)
    refuse_jobs(cluster, namespace, attempt=1)
    kube.failed_pod(NAME, 0, 0, namespace, exit_code=1)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "Rejected"
    assert "the API refused Job dog-lora-a1" in status["failureMessage"]
    assert "spec.template.spec.affinity.nodeAffinity" in status["failureMessage"]
    assert condition(status, "Restarting")["status"] == "False"
    kube.wait_event(namespace, NAME, "Rejected")


def job_file(kube: Kube, namespace: str) -> str | None:
    try:
        found = kube.core.read_namespaced_config_map(f"{NAME}-config", namespace)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return str(found.data["job.yaml"])


def test_a_job_file_deleted_by_hand_is_written_again_from_the_unchanged_spec(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    start(kube, namespace)
    run_gang(kube, namespace)
    before = job_file(kube, namespace)
    kube.core.delete_namespaced_config_map(f"{NAME}-config", namespace)
    operator.kill()
    operator.start()
    event = kube.wait_event(namespace, NAME, "JobFileRecreated")
    assert event.type == "Warning"
    assert f"ConfigMap {NAME}-config" in event.message
    assert job_file(kube, namespace) == before
    owner = kube.core.read_namespaced_config_map(f"{NAME}-config", namespace).metadata
    assert owner.owner_references[0].uid == kube.job(NAME, namespace)["metadata"]["uid"]
    # The job goes on being reconciled.
    kube.job_condition(f"{NAME}-a0", namespace, "Complete")
    kube.wait_phase(NAME, namespace, "Succeeded")


@pytest.mark.usefixtures("operator")
def test_children_deleted_by_hand_are_created_again_for_the_next_attempt(
    kube: Kube, namespace: str
) -> None:
    """The running pods keep their mounted job file; a new attempt's pods need it, and
    the Service their ranks find each other by."""
    start(kube, namespace, runPolicy={"backoffLimit": 2})
    run_gang(kube, namespace)
    before = job_file(kube, namespace)
    kube.core.delete_namespaced_config_map(f"{NAME}-config", namespace)
    kube.core.delete_namespaced_service(f"{NAME}-gang", namespace)
    kube.failed_pod(NAME, 0, 0, namespace, exit_code=1)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    kube.wait_batch_job(f"{NAME}-a1", namespace)
    assert job_file(kube, namespace) == before
    owner = kube.job(NAME, namespace)["metadata"]["uid"]
    service = kube.core.read_namespaced_service(f"{NAME}-gang", namespace).metadata
    assert service.owner_references[0].uid == owner
    event = kube.wait_event(namespace, NAME, "ChildrenRecreated")
    assert event.type == "Warning"
    assert f"ConfigMap {NAME}-config, Service {NAME}-gang missing" in event.message
    assert "attempt 1" in event.message
    run_gang(kube, namespace, attempt=1)


def test_a_job_file_deleted_by_hand_after_a_spec_change_fails_the_job_saying_so(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    start(kube, namespace)
    run_gang(kube, namespace)
    kube.patch_spec(NAME, namespace, {"runPolicy": {"backoffLimit": 5}})
    wait_for(lambda: kube.job(NAME, namespace)["metadata"]["generation"] == 2, what="gen 2")
    kube.core.delete_namespaced_config_map(f"{NAME}-config", namespace)
    operator.kill()
    operator.start()
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "JobFileMissing"
    assert f"ConfigMap {NAME}-config" in status["failureMessage"]
    event = kube.wait_event(namespace, NAME, "Failed")
    assert "JobFileMissing" in event.message
    # A failed job keeps no attempt running.
    wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="attempt 0 deleted")


def test_a_job_file_replaced_by_one_not_the_jobs_is_not_overwritten_and_fails_saying_so(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """A ConfigMap of another owner under the job file's name may be someone's own: it
    stays as it is, and the message says it is not this job's (not that the spec
    changed: it did not)."""
    from kubernetes import client

    start(kube, namespace)
    run_gang(kube, namespace)
    kube.core.delete_namespaced_config_map(f"{NAME}-config", namespace)
    theirs = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=f"{NAME}-config"), data={"notes": "mine"}
    )
    kube.core.create_namespaced_config_map(namespace, theirs)
    operator.kill()
    operator.start()
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "JobFileMissing"
    assert (
        f"ConfigMap {NAME}-config, the job file this job was created with, is held by a "
        "ConfigMap that is not this job's (replaced by hand?), which is not overwritten"
    ) in status["failureMessage"]
    kept = kube.core.read_namespaced_config_map(f"{NAME}-config", namespace)
    assert kept.data == {"notes": "mine"}


def test_a_job_file_a_newer_operator_refuses_fails_the_job_naming_the_field(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """A job created under an operator that accepted what this one refuses (an hf://
    output, taken as a local path in the pod): after the upgrade the operator fails it
    once, naming the field, rather than raising on every tick."""
    start(kube, namespace)
    run_gang(kube, namespace)
    text = job_file(kube, namespace)
    assert text is not None
    document = yaml.safe_load(text)
    document["spec"]["output"]["uri"] = "hf://me/disc-lora"
    kube.core.patch_namespaced_config_map(
        f"{NAME}-config", namespace, {"data": {"job.yaml": yaml.safe_dump(document)}}
    )
    operator.kill()
    operator.start()
    status = kube.wait_phase(NAME, namespace, "Failed")
    assert status["failureReason"] == "InvalidSpec"
    assert "no longer passes this operator's checks: spec.output.uri:" in status["failureMessage"]
    event = kube.wait_event(namespace, NAME, "Failed")
    assert "InvalidSpec" in event.message
    wait_for(lambda: kube.batch_job(f"{NAME}-a0", namespace) is None, what="attempt 0 deleted")


FORBIDDEN = (
    'admission webhook "validation.gatekeeper.sh" denied the request: [gpu-jobs-need-a-team] '
    "label team is required"
)


def forbid_jobs(cluster: EmulatedCluster, namespace: str) -> None:
    """The API forbids the next three Jobs created in `namespace`, then allows them."""
    cluster.handler.refuse(
        kmock.action.CREATE, "jobs", namespace, 403, FORBIDDEN, reason="Forbidden", times=3
    )


def wait_forbidden(kube: Kube, namespace: str, type_: str) -> dict[str, Any]:
    """The job's status once its `type_` condition says the API forbids a child."""
    return kube.wait_status(
        NAME, namespace, lambda s: reason(s, type_) == "Forbidden", f"{type_}=False Forbidden"
    )


@pytest.mark.usefixtures("operator")
def test_a_forbidden_job_waits_with_the_apis_word_and_is_created_once_allowed(
    kube: Kube, namespace: str, cluster: EmulatedCluster
) -> None:
    """An admission policy (or a quota on Jobs, or missing RBAC) forbids the Job: the
    cluster's admins may change that, so the job waits, saying why, and tries again."""
    forbid_jobs(cluster, namespace)
    kube.create_job(document(), namespace)
    status = wait_forbidden(kube, namespace, "Created")
    assert status["phase"] == "Pending"
    assert condition(status, "Created")["status"] == "False"
    assert FORBIDDEN in condition(status, "Created")["message"]
    event = kube.wait_event(namespace, NAME, "Forbidden")
    assert event.type == "Warning"
    assert FORBIDDEN in event.message
    # Allowed again (the refusals used up): the Job is made and the job goes on.
    kube.wait_batch_job(f"{NAME}-a0", namespace)
    run_gang(kube, namespace)


@pytest.mark.usefixtures("operator")
def test_a_spec_edited_while_the_job_waits_to_be_created_is_ignored_as_it_says(
    kube: Kube, namespace: str, cluster: EmulatedCluster
) -> None:
    """The job file is written on the first try: the Job made once allowed is built from
    it, as the SpecChangeIgnored event says, not from the edited spec (which an operator
    restart would then trade back for the job file's)."""
    forbid_jobs(cluster, namespace)
    kube.create_job(document(), namespace)
    wait_forbidden(kube, namespace, "Created")
    before = job_file(kube, namespace)
    kube.patch_spec(NAME, namespace, {"resources": {"nodes": 1}})
    assert "resources.nodes" in kube.wait_event(namespace, NAME, "SpecChangeIgnored").message
    job = kube.wait_batch_job(f"{NAME}-a0", namespace)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (2, 2)
    assert job_file(kube, namespace) == before
    run_gang(kube, namespace)


@pytest.mark.usefixtures("operator")
def test_a_forbidden_new_attempt_waits_with_the_apis_word(
    kube: Kube, namespace: str, cluster: EmulatedCluster
) -> None:
    start(kube, namespace, runPolicy={"backoffLimit": 2})
    run_gang(kube, namespace)
    forbid_jobs(cluster, namespace)
    kube.failed_pod(NAME, 0, 0, namespace, exit_code=1)
    kube.job_condition(f"{NAME}-a0", namespace, "Failed", "BackoffLimitExceeded")
    status = wait_forbidden(kube, namespace, "Running")
    assert status["phase"] == "Restarting"
    assert status["attempt"] == 1
    assert FORBIDDEN in condition(status, "Running")["message"]
    assert FORBIDDEN in kube.wait_event(namespace, NAME, "Forbidden").message
    kube.wait_batch_job(f"{NAME}-a1", namespace)
    status = run_gang(kube, namespace, attempt=1)
    assert status["restarts"] == 1
    assert not [e for e in kube.events(namespace, NAME) if e.reason == "JobRecreated"]
