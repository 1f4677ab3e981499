"""A job's next status and the actions that get it there, from what is observed.

One pure function, `reconcile`, level-triggered: it looks at the FineTuneJob's
status and run policy, the Job of its current attempt and that attempt's pods,
and returns the operator's part of the status plus what to do (start or stop an
attempt, suspend, delete a finished job). It never touches what the trainer
writes (progress, lastCheckpoint, artifacts). The kopf handlers feed it and
carry out its actions; the policies themselves live here and in `failures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from finetune.api.cluster import RunPolicy
from finetune.api.status import (
    Condition,
    ConditionStatus,
    ConditionType,
    FineTuneJobStatus,
    Phase,
)

from . import failures
from .failures import Failure

FINISHED = (Phase.SUCCEEDED, Phase.FAILED)


# --- actions ----------------------------------------------------------------


@dataclass(frozen=True)
class StartAttempt:
    attempt: int
    deadline_seconds: int | None = None  # what is left of activeDeadlineSeconds


@dataclass(frozen=True)
class StopAttempt:
    attempt: int


@dataclass(frozen=True)
class SuspendAttempt:
    attempt: int
    suspend: bool


@dataclass(frozen=True)
class DeleteFineTuneJob:
    pass


Action = StartAttempt | StopAttempt | SuspendAttempt | DeleteFineTuneJob


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    generation: int
    nodes: int
    policy: RunPolicy
    status: FineTuneJobStatus
    batch_job: dict[str, Any] | None  # the Job of status.attempt, if it exists
    pods: list[dict[str, Any]]  # that attempt's pods
    now: datetime


@dataclass
class Outcome:
    status: FineTuneJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    restarted: str | None = None  # reason, for metrics
    failed: str | None = None  # reason, for metrics


# --- conditions ---------------------------------------------------------------


def set_condition(
    status: FineTuneJobStatus,
    type_: ConditionType,
    value: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> None:
    """One condition per type; its transition time moves only when its status does."""
    new_status = ConditionStatus.TRUE if value else ConditionStatus.FALSE
    for index, condition in enumerate(status.conditions):
        if condition.type == type_.value:
            moved = condition.status != new_status
            status.conditions[index] = Condition(
                type=type_.value,
                status=new_status,
                reason=reason,
                message=message,
                observed_generation=generation,
                last_transition_time=now if moved else condition.last_transition_time,
            )
            return
    status.conditions.append(
        Condition(
            type=type_.value,
            status=new_status,
            reason=reason,
            message=message,
            observed_generation=generation,
            last_transition_time=now,
        )
    )


def condition_is(status: FineTuneJobStatus, type_: ConditionType) -> bool:
    return any(
        c.type == type_.value and c.status == ConditionStatus.TRUE for c in status.conditions
    )


def created(status: FineTuneJobStatus, generation: int, job_name: str, now: datetime) -> None:
    status.phase = Phase.PENDING
    status.observed_generation = generation
    set_condition(
        status,
        ConditionType.CREATED,
        True,
        "ChildrenCreated",
        f"created the job file, the gang's Service, its RBAC and Job {job_name}",
        generation,
        now,
    )


def invalid(status: FineTuneJobStatus, generation: int, message: str, now: datetime) -> None:
    _finish(status, generation, now, Phase.FAILED, "InvalidSpec", message)


# --- the Job ---------------------------------------------------------------------


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return dict(condition)
    return None


def parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


# --- the policies --------------------------------------------------------------


def _finish(
    status: FineTuneJobStatus,
    generation: int,
    now: datetime,
    phase: Phase,
    reason: str,
    message: str,
) -> None:
    status.phase = phase
    status.completion_time = status.completion_time or now
    succeeded = phase is Phase.SUCCEEDED
    kind = ConditionType.SUCCEEDED if succeeded else ConditionType.FAILED
    set_condition(status, kind, True, reason, message, generation, now)
    for other in (ConditionType.RUNNING, ConditionType.RESTARTING):
        if condition_is(status, other):
            set_condition(status, other, False, reason, message, generation, now)
    if not succeeded:
        status.failure_reason, status.failure_message = reason, message


def _fail(o: Observed, out: Outcome, reason: str, message: str) -> Outcome:
    _finish(out.status, o.generation, o.now, Phase.FAILED, reason, message)
    if o.batch_job is not None:
        out.actions.append(StopAttempt(out.status.attempt))
    out.events.append(Event("Warning", "Failed", f"{reason}: {message}"))
    out.failed = reason
    return out


def _remaining_deadline(o: Observed) -> int | None:
    limit, started = o.policy.active_deadline_seconds, o.status.start_time
    if limit is None or started is None:
        return limit
    return int(limit - (o.now - started).total_seconds())


def _restart(o: Observed, out: Outcome, failure: Failure) -> Outcome:
    """Tear down the gang and start a new attempt, which resumes from the last checkpoint."""
    status = out.status
    if failure.counted:
        status.failed_attempts += 1
        if status.failed_attempts > o.policy.backoff_limit:
            return _fail(
                o,
                out,
                "BackoffLimitExceeded",
                f"{status.failed_attempts} failed attempts (backoffLimit {o.policy.backoff_limit}); "
                f"the last: {failure.reason}: {failure.message}",
            )
    previous, status.attempt = status.attempt, status.attempt + 1
    status.restarts += 1
    status.phase = Phase.RESTARTING
    counted = (
        f"{status.failed_attempts} of backoffLimit {o.policy.backoff_limit} used"
        if failure.counted
        else "not counted against backoffLimit"
    )
    message = f"{failure.message}; starting attempt {status.attempt} ({counted})"
    set_condition(
        status, ConditionType.RESTARTING, True, failure.reason, message, o.generation, o.now
    )
    set_condition(
        status, ConditionType.RUNNING, False, failure.reason, message, o.generation, o.now
    )
    out.actions += [StopAttempt(previous), StartAttempt(status.attempt, _remaining_deadline(o))]
    out.events.append(Event("Warning", "Restarted", f"{failure.reason}: {message}"))
    out.restarted = failure.reason
    return out


def _after_failed_job(o: Observed, out: Outcome, job_failed: dict[str, Any]) -> Outcome:
    if job_failed.get("reason") == "DeadlineExceeded":
        return _fail(
            o,
            out,
            "DeadlineExceeded",
            f"ran longer than runPolicy.activeDeadlineSeconds ({o.policy.active_deadline_seconds}s)",
        )
    failure = failures.classify(o.pods, job_failed.get("message", ""))
    if failure.permanent:
        return _fail(o, out, failure.reason, failure.message)
    return _restart(o, out, failure)


def _suspension(o: Observed, out: Outcome, job: dict[str, Any]) -> Outcome | None:
    """Suspend and resume; None when the attempt runs as it should."""
    status, job_suspended = out.status, bool(job.get("spec", {}).get("suspend"))
    if o.policy.suspend:
        if not job_suspended:
            out.actions.append(SuspendAttempt(status.attempt, True))
        if status.phase is not Phase.SUSPENDED:
            out.events.append(
                Event("Normal", "Suspended", "pods stopped; checkpoints are kept for resume")
            )
        status.phase = Phase.SUSPENDED
        message = "runPolicy.suspend is true: the pods are stopped, checkpoints kept"
        set_condition(
            status, ConditionType.SUSPENDED, True, "Suspended", message, o.generation, o.now
        )
        if condition_is(status, ConditionType.RUNNING):
            set_condition(
                status, ConditionType.RUNNING, False, "Suspended", message, o.generation, o.now
            )
        return out
    if job_suspended and o.policy.queue_name:
        # Kueue unsuspends the Job when it admits the workload.
        status.phase = Phase.PENDING
        message = f"waiting for Kueue to admit it from queue {o.policy.queue_name}"
        set_condition(
            status,
            ConditionType.SUSPENDED,
            True,
            "WaitingForAdmission",
            message,
            o.generation,
            o.now,
        )
        return out
    if job_suspended:
        out.actions.append(SuspendAttempt(status.attempt, False))
    if condition_is(status, ConditionType.SUSPENDED):
        set_condition(
            status,
            ConditionType.SUSPENDED,
            False,
            "Resumed",
            "resumed; training continues from the last checkpoint",
            o.generation,
            o.now,
        )
        status.phase = Phase.PENDING
        out.events.append(Event("Normal", "Resumed", "training continues from the last checkpoint"))
        return out
    return None


def _heartbeat_lost(o: Observed, job: dict[str, Any]) -> Failure | None:
    """No progress report for heartbeatTimeoutSeconds, counted from the later of the
    last report and this attempt's start (loading a model reports nothing)."""
    references = [parse_time(job.get("status", {}).get("startTime"))]
    if o.status.progress is not None:
        references.append(o.status.progress.last_heartbeat)
    known = [t for t in references if t is not None]
    if not known:
        return None
    silent = o.now - max(known)
    timeout = timedelta(seconds=o.policy.heartbeat_timeout_seconds)
    if silent <= timeout:
        return None
    return failures.Failure(
        failures.Kind.ERROR,
        "HeartbeatTimeout",
        f"no progress reported for {int(silent.total_seconds())}s "
        f"(runPolicy.heartbeatTimeoutSeconds {o.policy.heartbeat_timeout_seconds})",
    )


def _running(o: Observed, out: Outcome, job: dict[str, Any]) -> Outcome:
    status = out.status
    active = int(job.get("status", {}).get("active") or 0)
    if active < o.nodes:
        if status.phase is not Phase.RESTARTING:
            status.phase = Phase.PENDING
        return out
    if status.start_time is None:
        status.start_time = o.now
        out.events.append(Event("Normal", "Started", f"all {o.nodes} pods of the gang run"))
    if condition_is(status, ConditionType.RESTARTING):
        set_condition(
            status,
            ConditionType.RESTARTING,
            False,
            "Restarted",
            f"attempt {status.attempt} runs",
            o.generation,
            o.now,
        )
    status.phase = Phase.RUNNING
    set_condition(
        status,
        ConditionType.RUNNING,
        True,
        "PodsRunning",
        f"{active} pods of attempt {status.attempt} run",
        o.generation,
        o.now,
    )
    lost = _heartbeat_lost(o, job)
    return _restart(o, out, lost) if lost is not None else out


def reconcile(o: Observed) -> Outcome:
    out = Outcome(status=o.status.model_copy(deep=True))
    status = out.status
    status.observed_generation = o.generation
    if status.phase in FINISHED:
        ttl, done = o.policy.ttl_seconds_after_finished, status.completion_time
        if ttl is not None and done is not None and o.now >= done + timedelta(seconds=ttl):
            out.actions.append(DeleteFineTuneJob())
        return out
    job = o.batch_job
    if job is None:  # not created yet, or removed behind our back: (re)create it
        out.actions.append(StartAttempt(status.attempt, _remaining_deadline(o)))
        return out
    if _job_condition(job, "Complete") is not None:
        _finish(
            status,
            o.generation,
            o.now,
            Phase.SUCCEEDED,
            "TrainingComplete",
            "all pods finished; the results are in spec.output.uri",
        )
        out.events.append(Event("Normal", "Succeeded", "training finished"))
        return out
    if (job_failed := _job_condition(job, "Failed")) is not None:
        return _after_failed_job(o, out, job_failed)
    remaining = _remaining_deadline(o)
    if remaining is not None and remaining <= 0 and status.start_time is not None:
        return _fail(
            o,
            out,
            "DeadlineExceeded",
            f"ran longer than runPolicy.activeDeadlineSeconds ({o.policy.active_deadline_seconds}s)",
        )
    if (suspended := _suspension(o, out, job)) is not None:
        return suspended
    return _running(o, out, job)
