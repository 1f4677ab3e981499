"""A job's next status and the actions that get it there, from what is observed.

One pure function, `reconcile`, level-triggered: it looks at the FineTuneJob's
status and run policy, the Job of its current attempt and that attempt's pods,
and returns the operator's part of the status plus what to do (start or stop an
attempt, suspend, delete a finished job). It never touches what the trainer
writes (progress, lastCheckpoint, artifacts, earlyStop), though it reads earlyStop
for the reason of a success. The kopf handlers feed it and
carry out its actions; the policies themselves live here and in `failures`;
what the pods are doing is read by `gang`.

Phases and conditions read back from the API are plain strings (the models use
`use_enum_values`): they are compared by value, never by identity.
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
    FailedAttempt,
    FineTuneJobStatus,
    Phase,
)

from . import failures, gang
from .builders import DEADLINE_ANNOTATION
from .failures import Failure

FINISHED = (Phase.SUCCEEDED, Phase.FAILED)


# --- actions ----------------------------------------------------------------


@dataclass(frozen=True)
class StartAttempt:
    attempt: int
    deadline_seconds: int | None = None  # what is left of activeDeadlineSeconds
    missing: bool = False  # the attempt's Job was there and is gone (deleted by hand)


@dataclass(frozen=True)
class StopAttempt:
    attempt: int


@dataclass(frozen=True)
class SuspendAttempt:
    attempt: int
    suspend: bool


@dataclass(frozen=True)
class SetDeadline:
    """The running attempt's Job deadline, after runPolicy.activeDeadlineSeconds changed."""

    attempt: int
    seconds: int | None  # the Job's activeDeadlineSeconds; None removes it
    limit: int | None  # the runPolicy value it is made from


@dataclass(frozen=True)
class DeleteFineTuneJob:
    pass


Action = StartAttempt | StopAttempt | SuspendAttempt | SetDeadline | DeleteFineTuneJob


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
    # Why the Job controller cannot create that attempt's missing pods (its newest
    # FailedCreate event: a ResourceQuota, Pod Security admission), if it said.
    creation_refused: str | None = None


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


def find_condition(status: FineTuneJobStatus, type_: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_.value), None)


def condition_is(status: FineTuneJobStatus, type_: ConditionType) -> bool:
    found = find_condition(status, type_)
    return found is not None and found.status == ConditionStatus.TRUE


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


def waiting_to_create(
    status: FineTuneJobStatus, generation: int, reason: str, message: str, now: datetime
) -> None:
    """The children cannot be created yet: objects of another owner hold some of their
    names (a previous job of this name whose children the garbage collector has not
    removed yet), or the API forbids one (an admission policy, a quota)."""
    status.phase = Phase.PENDING
    status.observed_generation = generation
    set_condition(status, ConditionType.CREATED, False, reason, message, generation, now)


def unbuildable(
    status: FineTuneJobStatus, generation: int, reason: str, message: str, now: datetime
) -> None:
    """Fail a job whose children cannot be built from `generation` of its spec: it does
    not validate (`InvalidSpec`), the API refused what the operator built from it, which
    passed the CRD's schema but not the API's own checks (`Rejected`: an affinity, a
    toleration), or its job file is gone and the spec it held cannot be known again
    (`JobFileMissing`)."""
    status.observed_generation = generation
    _finish(status, generation, now, Phase.FAILED, reason, message)


# --- the Job ---------------------------------------------------------------------


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return dict(condition)
    return None


def job_active(job: dict[str, Any]) -> bool:
    """The Job neither completed nor failed, nor is it being deleted: its pods may run."""
    finished = _job_condition(job, "Complete") or _job_condition(job, "Failed")
    return finished is None and not job.get("metadata", {}).get("deletionTimestamp")


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
    succeeded = phase == Phase.SUCCEEDED
    kind = ConditionType.SUCCEEDED if succeeded else ConditionType.FAILED
    set_condition(status, kind, True, reason, message, generation, now)
    for other in (ConditionType.RUNNING, ConditionType.RESTARTING):
        if condition_is(status, other):
            set_condition(status, other, False, reason, message, generation, now)
    if not succeeded:
        status.failure_reason, status.failure_message = reason, message


def _fail(o: Observed, out: Outcome, reason: str, message: str, stop: bool = True) -> Outcome:
    """Fail the job for good. `stop` deletes the attempt's Job (its pods still run or
    wait); a Job that failed by itself is kept instead, for its pods' logs."""
    _finish(out.status, o.generation, o.now, Phase.FAILED, reason, message)
    if stop and o.batch_job is not None:
        out.actions.append(StopAttempt(out.status.attempt))
    out.events.append(Event("Warning", "Failed", f"{reason}: {message}"))
    out.failed = reason
    return out


def _keep_failed_attempt(o: Observed, out: Outcome, reason: str) -> None:
    """Keep the attempt whose Job failed (its failed pods hold the logs) in place of
    the one kept before, which goes."""
    status = out.status
    kept = status.last_failed_attempt
    if kept is not None and kept.attempt != status.attempt:
        out.actions.append(StopAttempt(kept.attempt))
    failed_pods = sorted(
        str(p.get("metadata", {}).get("name", ""))
        for p in o.pods
        if p.get("status", {}).get("phase") == "Failed"
    )
    status.last_failed_attempt = FailedAttempt(
        attempt=status.attempt,
        job=str((o.batch_job or {}).get("metadata", {}).get("name", "")),
        pods=failed_pods,
        reason=reason,
    )


def _remaining_deadline(o: Observed) -> int | None:
    limit, started = o.policy.active_deadline_seconds, o.status.start_time
    if limit is None or started is None:
        return limit
    return int(limit - (o.now - started).total_seconds())


def _deadline_update(o: Observed, job: dict[str, Any]) -> SetDeadline | None:
    """A changed runPolicy.activeDeadlineSeconds, carried to the attempt's Job: the Job
    controller enforces the deadline the Job has. The Job's deadline moves by the
    change (a restarted attempt's is what was left of the limit); a Job made without
    one gets the limit less the time used before the Job was made."""
    annotations = job.get("metadata", {}).get("annotations") or {}
    try:
        text = annotations[DEADLINE_ANNOTATION]
        made_from = int(text) if text else None
    except (KeyError, ValueError):
        return None  # not made by this operator's builders: leave it
    limit = o.policy.active_deadline_seconds
    if made_from == limit:
        return None
    if limit is None:
        return SetDeadline(o.status.attempt, None, None)
    live = job.get("spec", {}).get("activeDeadlineSeconds")
    if made_from is not None and live is not None:
        seconds = int(live) + limit - made_from
    else:
        created = parse_time(job.get("metadata", {}).get("creationTimestamp"))
        started = o.status.start_time
        used = (created - started).total_seconds() if created and started else 0
        seconds = limit - int(max(0.0, used))
    return SetDeadline(o.status.attempt, max(1, seconds), limit)


def _restart(o: Observed, out: Outcome, failure: Failure, job_failed: bool) -> Outcome:
    """Start a new attempt, which resumes from the last checkpoint. An attempt whose
    Job failed is kept for its logs; one that still runs (a hang) is torn down."""
    status = out.status
    if job_failed:
        _keep_failed_attempt(o, out, failure.reason)
    if failure.counted:
        status.failed_attempts += 1
        if status.failed_attempts > o.policy.backoff_limit:
            return _fail(
                o,
                out,
                "BackoffLimitExceeded",
                f"{status.failed_attempts} failed attempts (backoffLimit {o.policy.backoff_limit}); "
                f"the last: {failure.reason}: {failure.message}",
                stop=not job_failed,
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
    if not job_failed:
        out.actions.append(StopAttempt(previous))
    out.actions.append(StartAttempt(status.attempt, _remaining_deadline(o)))
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
    failure = failures.classify(o.pods, job_failed, o.batch_job)
    if failure.permanent:
        _keep_failed_attempt(o, out, failure.reason)
        return _fail(o, out, failure.reason, failure.message, stop=False)
    return _restart(o, out, failure, job_failed=True)


def _suspension(o: Observed, out: Outcome, job: dict[str, Any]) -> Outcome | None:
    """Suspend and resume; None when the attempt runs as it should."""
    status, job_suspended = out.status, bool(job.get("spec", {}).get("suspend"))
    if o.policy.suspend:
        if not job_suspended:
            out.actions.append(SuspendAttempt(status.attempt, True))
        if status.phase != Phase.SUSPENDED:
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


def _heartbeat_lost(o: Observed, running_since: datetime | None) -> Failure | None:
    """No progress report for heartbeatTimeoutSeconds, counted from the later of the
    last report and the moment this attempt's gang ran (loading a model reports
    nothing; waiting for GPUs is not a hang)."""
    references = [running_since]
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


def _waiting_since(o: Observed, job: dict[str, Any]) -> datetime | None:
    """Since when this attempt's gang has waited to be scheduled: its Job's creation,
    or the last resume (or Kueue's admission) if later."""
    moments = [parse_time(job.get("metadata", {}).get("creationTimestamp"))]
    suspended = find_condition(o.status, ConditionType.SUSPENDED)
    if suspended is not None and suspended.status == ConditionStatus.FALSE:
        moments.append(suspended.last_transition_time)
    known = [m for m in moments if m is not None]
    return max(known) if known else None


def _waiting(o: Observed, out: Outcome, job: dict[str, Any], pods: gang.Gang) -> Outcome:
    """The gang does not run yet: Pending (or still Restarting), with the reason in the
    Running condition and, for a problem, one event each time the reason changes."""
    status = out.status
    if status.phase != Phase.RESTARTING:
        status.phase = Phase.PENDING
    reason, message = pods.waiting(o.creation_refused)
    before = find_condition(status, ConditionType.RUNNING)
    changed = before is None or before.status == ConditionStatus.TRUE or before.reason != reason
    if changed and reason not in gang.STARTING:
        out.events.append(Event("Warning", reason, message))
    set_condition(status, ConditionType.RUNNING, False, reason, message, o.generation, o.now)
    limit, since = o.policy.scheduling_timeout_seconds, _waiting_since(o, job)
    if limit is None or since is None or pods.scheduled:
        return out
    if (o.now - since).total_seconds() <= limit:
        return out
    return _fail(
        o,
        out,
        "SchedulingTimeout",
        f"attempt {status.attempt}'s pods were not all scheduled within "
        f"runPolicy.schedulingTimeoutSeconds ({limit}s): {reason}: {message}",
    )


def _running(o: Observed, out: Outcome, job: dict[str, Any]) -> Outcome:
    status = out.status
    pods = gang.read(o.pods, o.nodes)
    if pods.failed:
        return out  # the Job controller is about to mark the Job Failed: hold the phase
    running = find_condition(status, ConditionType.RUNNING)
    if not pods.runs:
        # A rank's pod being deleted while the others train: they hang in a collective
        # without it, which only their silence shows (a pod on a lost node may stay
        # Terminating for ever, and its replacement waits for it).
        lost = (
            _heartbeat_lost(o, running.last_transition_time if running is not None else None)
            if pods.training and pods.leaving
            else None
        )
        return _restart(o, out, lost, job_failed=False) if lost else _waiting(o, out, job, pods)
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
    finished = pods.count(gang.RankState.SUCCEEDED)
    set_condition(
        status,
        ConditionType.RUNNING,
        True,
        "PodsRunning",
        f"the {o.nodes} pods of attempt {status.attempt} run"
        + (f" ({finished} finished)" if finished else ""),
        o.generation,
        o.now,
    )
    if not pods.training:
        return out  # every rank finished: the Job completes next
    running = find_condition(status, ConditionType.RUNNING)  # as set above
    lost = _heartbeat_lost(o, running.last_transition_time if running is not None else None)
    return _restart(o, out, lost, job_failed=False) if lost is not None else out


def _succeeded(o: Observed, out: Outcome) -> Outcome:
    status = out.status
    early = status.early_stop  # the trainer's word: its metric stopped improving
    _finish(
        status,
        o.generation,
        o.now,
        Phase.SUCCEEDED,
        "EarlyStopped" if early is not None else "TrainingComplete",
        (f"{early.message}; " if early is not None else "all pods finished; ")
        + "the results are in spec.output.uri",
    )
    if status.last_failed_attempt is not None:  # no longer needed for debugging
        out.actions.append(StopAttempt(status.last_failed_attempt.attempt))
        status.last_failed_attempt = None
    out.events.append(
        Event(
            "Normal",
            "Succeeded",
            f"training stopped early: {early.message}"
            if early is not None
            else "training finished",
        )
    )
    return out


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
    if job is None:  # not in the index yet (creating it again is a no-op), or deleted
        out.actions.append(StartAttempt(status.attempt, _remaining_deadline(o), missing=True))
        return out
    if _job_condition(job, "Complete") is not None:
        return _succeeded(o, out)
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
    if (deadline := _deadline_update(o, job)) is not None:
        out.actions.append(deadline)
    if (suspended := _suspension(o, out, job)) is not None:
        return suspended
    return _running(o, out, job)
