"""The operator's decisions as pure functions: the cases the process tests do not reach."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune.api.cluster import RunPolicy
from finetune.api.status import ConditionType, FineTuneJobStatus, Phase, Progress
from finetune_operator import builders, failures, gang, reconcile, spec_changes
from finetune_operator.reconcile import Observed, SetDeadline, StartAttempt, StopAttempt

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def observed(
    status: FineTuneJobStatus,
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]] | None = None,
    **policy: Any,
) -> Observed:
    return Observed(
        generation=1,
        nodes=2,
        policy=RunPolicy.model_validate(policy),
        status=status,
        batch_job=job,
        pods=pods or [],
        now=NOW,
    )


def running_job(started: datetime) -> dict[str, Any]:
    return {"spec": {}, "status": {"active": 2, "startTime": stamp(started)}}


def pod(index: int, **status: Any) -> dict[str, Any]:
    meta = {
        "name": f"p{index}",
        "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
    }
    return {"metadata": meta, "status": {"phase": "Failed", **status}}


def exited(code: int, reason: str = "Error") -> dict[str, Any]:
    terminated = {"exitCode": code, "reason": reason}
    return {"containerStatuses": [{"state": {"terminated": terminated}}]}


RUNNING: dict[str, Any] = {
    "phase": "Running",
    "containerStatuses": [{"state": {"running": {"startedAt": stamp(NOW)}}}],
}


def test_a_condition_keeps_its_transition_time_until_its_status_flips() -> None:
    status = FineTuneJobStatus()
    earlier = NOW - timedelta(hours=1)
    reconcile.set_condition(status, ConditionType.RUNNING, True, "PodsRunning", "a", 1, earlier)
    reconcile.set_condition(status, ConditionType.RUNNING, True, "PodsRunning", "b", 2, NOW)
    (running,) = status.conditions
    assert (running.last_transition_time, running.message, running.observed_generation) == (
        earlier,
        "b",
        2,
    )
    reconcile.set_condition(status, ConditionType.RUNNING, False, "Suspended", "c", 2, NOW)
    assert status.conditions[0].last_transition_time == NOW


def test_a_new_attempt_is_not_judged_by_the_last_attempts_heartbeat() -> None:
    status = FineTuneJobStatus(
        phase=Phase.RESTARTING,
        attempt=1,
        start_time=NOW - timedelta(hours=3),
        progress=Progress(step=10, last_heartbeat=NOW - timedelta(hours=2)),
    )
    fresh = running_job(started=NOW - timedelta(seconds=30))
    gang = [pod(0, **RUNNING), pod(1, **RUNNING)]
    outcome = reconcile.reconcile(observed(status, fresh, gang, heartbeatTimeoutSeconds=600))
    assert outcome.status.phase == Phase.RUNNING
    assert outcome.actions == []


def test_the_deadline_counts_from_the_first_start_across_attempts() -> None:
    status = FineTuneJobStatus(
        phase=Phase.RUNNING, attempt=2, start_time=NOW - timedelta(seconds=3000)
    )
    job = running_job(started=NOW - timedelta(seconds=60))
    failed = pod(0, **exited(1))
    job_failed = {**job, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    outcome = reconcile.reconcile(
        observed(status, job_failed, [failed], activeDeadlineSeconds=3600, backoffLimit=5)
    )
    # The failed attempt's Job is kept for its logs; the new one gets what is left.
    assert outcome.actions == [StartAttempt(3, deadline_seconds=600)]

    late = status.model_copy(update={"start_time": NOW - timedelta(seconds=3700)})
    outcome = reconcile.reconcile(observed(late, job, activeDeadlineSeconds=3600))
    assert outcome.status.phase == Phase.FAILED
    assert outcome.status.failure_reason == "DeadlineExceeded"
    assert outcome.actions == [StopAttempt(2)]


def test_a_changed_deadline_moves_the_running_attempts_job() -> None:
    started = NOW - timedelta(seconds=3000)
    status = FineTuneJobStatus(phase=Phase.RUNNING, attempt=2, start_time=started)
    gang = [pod(0, **RUNNING), pod(1, **RUNNING)]

    def attempt_job(made_from: str, live: int | None) -> dict[str, Any]:
        """Attempt 2's Job, made 3000 s into the job's run."""
        job = running_job(started=NOW - timedelta(seconds=60))
        job["metadata"] = {
            "creationTimestamp": stamp(NOW - timedelta(seconds=60)),
            "annotations": {builders.DEADLINE_ANNOTATION: made_from} if made_from != "-" else {},
        }
        job["spec"] = {} if live is None else {"activeDeadlineSeconds": live}
        return job

    def updates(job: dict[str, Any], **policy: Any) -> list[Any]:
        outcome = reconcile.reconcile(observed(status, job, gang, **policy))
        assert outcome.status.phase == Phase.RUNNING
        return [a for a in outcome.actions if isinstance(a, SetDeadline)]

    # Made with the 600 s left of 3600: a limit of 7200 leaves 4200.
    made = attempt_job("3600", 600)
    assert updates(made, activeDeadlineSeconds=3600) == []
    assert updates(made, activeDeadlineSeconds=7200) == [SetDeadline(2, 4200, 7200)]
    assert updates(made) == [SetDeadline(2, None, None)]
    # Made without a deadline: the limit less the 2940 s used before the Job was made.
    assert updates(attempt_job("", None), activeDeadlineSeconds=7200) == [
        SetDeadline(2, 4260, 7200)
    ]
    # A Job not made by these builders is left alone.
    assert updates(attempt_job("-", 600), activeDeadlineSeconds=7200) == []


def test_the_cause_of_a_gang_failure_is_its_root() -> None:
    preempted = pod(
        1,
        conditions=[
            {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
        ],
    )
    collateral = pod(0, **exited(1))
    oom = pod(2, **exited(137, "OOMKilled"))
    assert failures.classify([collateral, preempted]).reason == "NodeLost"
    assert failures.classify([collateral, preempted, oom]).reason == "OOMKilled"
    assert failures.classify([collateral]).reason == "TrainerError"
    assert "signal 9" in failures.classify([pod(0, **exited(137))]).message
    backoff = {
        "reason": "BackoffLimitExceeded",
        "message": "Job has reached the specified backoff limit",
    }
    nothing = failures.classify([], backoff)
    assert (nothing.reason, nothing.counted) == ("JobFailed", True)
    assert "backoff limit" in nothing.message


def test_a_disruption_is_not_counted_when_its_pod_is_gone() -> None:
    """The cluster deletes the pod it takes away, and the Job controller lets it go
    before it fails the Job: the cause comes from the Job, not from the pods left."""
    collateral = pod(0, **exited(1))
    by_policy = {
        "reason": "PodFailurePolicy",
        "message": "Pod ml/dog-lora-a0-1-x7k2p has condition DisruptionTarget matching "
        "FailJob rule at index 0",
    }
    found = failures.classify([collateral], by_policy)
    assert (found.reason, found.counted) == ("Disrupted", False)
    assert "dog-lora-a0-1-x7k2p" in found.message
    preempted = pod(
        1,
        conditions=[
            {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
        ],
    )
    seen = failures.disruption_of(preempted)
    assert seen is not None
    job = {"metadata": {"annotations": failures.remember(seen)}}
    kept = failures.classify([collateral], {"reason": "BackoffLimitExceeded"}, job)
    assert (kept.reason, kept.message, kept.counted) == ("Preempted", "pod p1: Preempted", False)
    # A permanent failure still explains everything.
    oom = pod(0, **exited(137, "OOMKilled"))
    assert failures.classify([oom], by_policy, job).reason == "OOMKilled"


def test_a_finished_job_waits_out_its_ttl() -> None:
    done = FineTuneJobStatus(phase=Phase.SUCCEEDED, completion_time=NOW - timedelta(seconds=30))
    assert reconcile.reconcile(observed(done, None, ttlSecondsAfterFinished=60)).actions == []
    assert reconcile.reconcile(observed(done, None, ttlSecondsAfterFinished=10)).actions == [
        reconcile.DeleteFineTuneJob()
    ]
    assert reconcile.reconcile(observed(done, None)).actions == []


def test_only_run_policy_knobs_change_after_creation() -> None:
    old = {"training": {"learningRate": 1e-4}, "runPolicy": {"backoffLimit": 3}}
    new = {
        "training": {"learningRate": 1e-3},
        "runPolicy": {"backoffLimit": 1, "suspend": True, "queueName": "other"},
    }
    applied, ignored = spec_changes.split(old, new)
    assert applied == ["spec.runPolicy.backoffLimit", "spec.runPolicy.suspend"]
    assert ignored == ["spec.runPolicy.queueName", "spec.training.learningRate"]
    assert spec_changes.split(old, old) == ([], [])


def test_a_phase_read_back_as_a_string_still_matches() -> None:
    """The API models hand back plain strings: a Suspended job read from the API
    must not post another Suspended event on every tick."""
    status = FineTuneJobStatus.model_validate({"phase": "Suspended", "attempt": 0})
    assert type(status.phase) is str
    job = {"spec": {"suspend": True}, "status": {}}
    outcome = reconcile.reconcile(observed(status, job, suspend=True))
    assert outcome.events == []
    restarting = FineTuneJobStatus.model_validate({"phase": "Restarting", "attempt": 1})
    outcome = reconcile.reconcile(observed(restarting, {"spec": {}, "status": {"active": 2}}))
    assert outcome.status.phase == Phase.RESTARTING


def test_the_gang_is_read_from_its_pods_not_the_jobs_active_count() -> None:
    waiting = {
        "phase": "Pending",
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "m"}
        ],
    }
    pulling = {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [{"state": {"waiting": {"reason": "ErrImagePull", "message": "x"}}}],
    }
    creating = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}
    done = {"phase": "Succeeded"}

    def read(*statuses: dict[str, Any]) -> gang.Gang:
        return gang.read([pod(i, **s) for i, s in enumerate(statuses)], nodes=2)

    assert read(RUNNING, RUNNING).runs
    assert read(RUNNING, done).runs
    assert read(RUNNING, done).training
    assert not read(done, done).training
    assert read(RUNNING, waiting).waiting() == ("Unschedulable", "1 of 2 pods waiting; rank 1: m")
    assert not read(RUNNING, waiting).scheduled
    assert read(pulling, waiting).waiting()[0] == "Unschedulable"
    assert read(creating, pulling).waiting() == ("ErrImagePull", "2 of 2 pods waiting; rank 1: x")
    assert read(creating, creating).waiting()[0] == "ContainerCreating"
    assert read(creating, creating).scheduled
    assert read(RUNNING).waiting() == ("CreatingPods", "1 of 2 pods not created yet")
    # A replacement pod stands for its rank; a failed pod only when nothing newer does.
    replaced = gang.read([pod(0), pod(0, **RUNNING), pod(1, **RUNNING)], nodes=2)
    assert replaced.runs
    assert not replaced.failed
    assert [r.pod for r in gang.read([pod(0), pod(1, **RUNNING)], nodes=2).failed] == ["p0"]


def test_a_hang_is_timed_from_when_the_gang_ran_not_from_the_jobs_start() -> None:
    status = FineTuneJobStatus(phase=Phase.PENDING)
    job = running_job(started=NOW - timedelta(hours=2))  # its pods waited for GPUs
    running = [pod(0, **RUNNING), pod(1, **RUNNING)]
    outcome = reconcile.reconcile(observed(status, job, running, heartbeatTimeoutSeconds=600))
    assert (outcome.status.phase, outcome.actions) == (Phase.RUNNING, [])
    assert outcome.status.start_time == NOW
    later = observed(outcome.status, job, running, heartbeatTimeoutSeconds=600)
    later = dataclasses.replace(later, now=NOW + timedelta(seconds=601))
    assert reconcile.reconcile(later).restarted == "HeartbeatTimeout"


def test_a_run_the_trainer_stopped_early_succeeds_with_that_reason() -> None:
    """The trainer's `status.earlyStop` (read back from the API as plain JSON) names the
    reason of the success; without it a success is `TrainingComplete`."""
    complete = {"spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    message = "stopped early after step 30: dino has not improved by more than 0 for 2 validations"
    early = FineTuneJobStatus.model_validate(
        {
            "phase": "Running",
            "earlyStop": {
                "step": 30,
                "metric": "dino",
                "best": 0.61,
                "bestStep": 10,
                "message": message,
            },
        }
    )
    outcome = reconcile.reconcile(observed(early, complete))
    assert outcome.status.phase == Phase.SUCCEEDED
    succeeded = reconcile.find_condition(outcome.status, ConditionType.SUCCEEDED)
    assert succeeded is not None
    assert succeeded.reason == "EarlyStopped"
    assert succeeded.message.startswith(message)
    assert outcome.events[-1].message == f"training stopped early: {message}"

    plain = FineTuneJobStatus.model_validate({"phase": "Running"})
    outcome = reconcile.reconcile(observed(plain, complete))
    succeeded = reconcile.find_condition(outcome.status, ConditionType.SUCCEEDED)
    assert succeeded is not None
    assert succeeded.reason == "TrainingComplete"


def test_a_rank_stuck_terminating_while_the_others_hang_restarts_the_gang() -> None:
    """A node lost, not deleted: its pod stays Terminating and the Job's replacement waits
    for it, while the other ranks hang in a collective. Their silence restarts the gang,
    as any hang does; a rank being deleted while the others still report is waited for."""
    status = FineTuneJobStatus(phase=Phase.PENDING)
    job = running_job(started=NOW)
    running = [pod(0, **RUNNING), pod(1, **RUNNING)]
    outcome = reconcile.reconcile(observed(status, job, running, heartbeatTimeoutSeconds=600))
    assert outcome.status.phase == Phase.RUNNING
    lost_node = pod(1, **RUNNING)
    lost_node["metadata"]["deletionTimestamp"] = stamp(NOW + timedelta(seconds=60))
    gone = [pod(0, **RUNNING), lost_node]

    def at(seconds: int, heartbeat: datetime | None = None) -> reconcile.Outcome:
        known = outcome.status.model_copy(deep=True)
        if heartbeat is not None:
            known.progress = Progress(step=3, total_steps=10, last_heartbeat=heartbeat)
        later = observed(known, job, gone, heartbeatTimeoutSeconds=600)
        return reconcile.reconcile(dataclasses.replace(later, now=NOW + timedelta(seconds=seconds)))

    waiting = at(300, heartbeat=NOW + timedelta(seconds=290))
    assert (waiting.status.phase, waiting.restarted) == (Phase.PENDING, None)
    assert at(900, heartbeat=NOW + timedelta(seconds=60)).restarted == "HeartbeatTimeout"
