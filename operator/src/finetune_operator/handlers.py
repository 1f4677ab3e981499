"""The kopf handlers: thin, they feed `reconcile` and carry out what it decides.

- on create: check the spec, build the children, adopt them, create them;
- a timer per job: observe its current attempt (from in-memory indexes of the
  operator's Jobs and pods, fed by watches), reconcile, act, patch status;
- on a spec change: apply run-policy changes, warn about the rest;
- on a pod the cluster takes away: remember it on its attempt's Job;
- on create and on delete: delete the job's groups on the Pushgateway;
- on every event: count jobs by phase for /metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
import yaml
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server
from pydantic import ValidationError

from finetune.api import API_VERSION, GROUP, KIND, VERSION, FineTuneJob
from finetune.api.cluster import RunPolicy
from finetune.api.errors import problems_from
from finetune.api.job import PLURAL
from finetune.api.pod import OPERATOR_FIELDS, RUNNING_PROGRESS_FIELDS
from finetune.api.status import ConditionType, FineTuneJobStatus, Phase

from . import (
    builders,
    failures,
    gang,
    metrics,
    ownership,
    pushgateway,
    reconcile,
    spec_changes,
)
from .builders import LABEL_ATTEMPT, LABEL_JOB, Names
from .config import OperatorConfig
from .kube import Cluster, ForbiddenError, RefusedError, connect, in_thread

CONFIG = OperatorConfig.from_env()
RESOURCE = (GROUP, VERSION, PLURAL)
OURS: dict[str, Any] = {
    LABEL_JOB: kopf.PRESENT,
    "app.kubernetes.io/managed-by": "finetune-operator",
}


class QuietTimers(logging.Filter):
    """Drop kopf's line per timer run: one per job every few seconds is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timer 'reconcile_job' succeeded")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Every operator setting, in one place."""
    # Progress and the last handled spec go in annotations: the CRD's status schema
    # would prune kopf's own status fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Our own milestone events only; kopf's handler logs stay in the log.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 16
    # A job deleted while its reconcile timer is mid-run (the TTL deletes it from inside
    # the timer) waits for the timer to stop before kopf lifts its finalizer; kopf's
    # default is to look again only after 60 s.
    settings.background.instant_exit_timeout = 0.5
    settings.background.cancellation_polling = 1.0
    logging.getLogger("kopf.objects").addFilter(QuietTimers())
    memo.config = CONFIG
    memo.cluster = Cluster(connect())
    start_http_server(CONFIG.metrics_port)


def _identity(body: kopf.Body) -> dict[str, Any]:
    """What tells an indexed object's owner, and whether it is going away."""
    return {
        "uid": body.meta.uid,
        "ownerReferences": [dict(r) for r in body.meta.get("ownerReferences") or []],
        "deletionTimestamp": body.meta.get("deletionTimestamp"),
    }


@kopf.index("batch", "v1", "jobs", labels=OURS)
def attempts(
    namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    ours = (failures.DISRUPTION_ANNOTATION, builders.DEADLINE_ANNOTATION)
    kept = {key: value for key, value in body.meta.annotations.items() if key in ours}
    slim = {
        "metadata": {
            "name": body.meta.name,
            "creationTimestamp": body.meta.get("creationTimestamp"),
            "annotations": kept,
            **_identity(body),
        },
        "spec": {
            "suspend": body.spec.get("suspend"),
            "activeDeadlineSeconds": body.spec.get("activeDeadlineSeconds"),
        },
        "status": dict(body.status),
    }
    return {(namespace, labels[LABEL_JOB], labels.get(LABEL_ATTEMPT)): slim}


@kopf.index("", "v1", "pods", labels=OURS)
def gang_pods(
    namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    meta = {"name": body.meta.name, "annotations": dict(body.meta.annotations), **_identity(body)}
    return {
        (namespace, labels[LABEL_JOB], labels.get(LABEL_ATTEMPT)): {
            "metadata": meta,
            "status": dict(body.status),
        }
    }


@kopf.on.event("", "v1", "pods", labels=OURS)
async def remember_disruption(
    body: kopf.Body,
    namespace: str | None,
    labels: Mapping[str, str],
    memo: kopf.Memo,
    **kwargs: Any,  # kopf passes the indexes by their names
) -> None:
    """Keep a disruption on the attempt's Job while its pod can still be seen: the pod
    is deleted, and may be gone by the time the Job fails."""
    disruption = failures.disruption_of(dict(body))
    if disruption is None:
        return
    attempts: kopf.Index[Any, Any] = kwargs["attempts"]
    key = (namespace, labels[LABEL_JOB], labels.get(LABEL_ATTEMPT))
    job = next(iter(attempts.get(key, [])), None)
    if job is None or failures.remembered(job) is not None:
        return
    if not reconcile.job_active(job):
        return  # already decided by what failed first (or being stopped)
    name = job["metadata"]["name"]
    await in_thread(
        memo.cluster.annotate_job, namespace or "default", name, failures.remember(disruption)
    )


def _document(name: str, namespace: str, spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec),
    }


def _now() -> datetime:
    return datetime.now(tz=UTC)


def _status_patch(before: dict[str, Any], after: FineTuneJobStatus) -> dict[str, Any]:
    """The operator's fields that changed; None clears one."""
    new = after.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {
        key: new.get(key)
        for key in OPERATOR_FIELDS
        if new.get(key) != before.get(key) and not (key not in new and key not in before)
    }


def _stale_progress(before: dict[str, Any], after: FineTuneJobStatus) -> dict[str, Any]:
    """Clear the trainer's ETA and throughput once the job stops running: on the tick it
    leaves Running, and on any tick of a finished or suspended job (a late report, sent
    as a stopped trainer ends its step, may bring them back). Not on every tick of a
    waiting job: a rank still training reports them."""
    leaving = before.get("phase") == Phase.RUNNING and after.phase != Phase.RUNNING
    if not (leaving or after.phase in (*reconcile.FINISHED, Phase.SUSPENDED)):
        return {}
    progress = before.get("progress") or {}
    stale = {key: None for key in RUNNING_PROGRESS_FIELDS if progress.get(key) is not None}
    return {"progress": stale} if stale else {}


def _post(body: kopf.Body, events: list[reconcile.Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


async def _write_status(memo: kopf.Memo, body: kopf.Body, changes: dict[str, Any]) -> None:
    """The timer's status write, made here rather than left to kopf: kopf patches what
    a timer leaves in `patch` after the handler, outside its error handling, and an
    error there (a 409, a 422, a 5xx past its retries) ends the job's timer for the
    operator's lifetime. Here it is a handler error, which kopf retries, and the next
    tick works out the status again."""
    if not changes:
        return
    name, namespace = body.meta.name or "", body.meta.namespace or "default"
    try:
        await in_thread(memo.cluster.patch_finetunejob_status, namespace, name, changes)
    except ApiException as exc:
        if exc.status == 404:
            return  # deleted meanwhile
        raise kopf.TemporaryError(
            f"writing the status was refused ({exc.status} {exc.reason}): {exc.body}; trying again",
            delay=memo.config.reconcile_seconds,
        ) from exc


@kopf.on.create(*RESOURCE)
async def create_children(
    body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    # A group a previous job of this name left would mix into this run's panels.
    await _forget_metrics(memo, body)
    patch.status.update(await _create(body, status, memo))


@kopf.on.delete(*RESOURCE, optional=True)
async def forget_metrics(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The job's groups on the Pushgateway go with it (its TTL's deletion too).
    Optional: it adds no finalizer of its own, so it holds no deletion that kopf's
    finalizer for the reconcile timer does not hold already; that one has it run on
    each deletion. A group it could not delete (the gateway unreachable, the finalizer
    removed by hand) goes when a job of the same name is created (`create_children`)."""
    await _forget_metrics(memo, body)


async def _forget_metrics(memo: kopf.Memo, body: kopf.Body) -> None:
    name, namespace = body.meta.name or "", body.meta.namespace or "default"
    await in_thread(pushgateway.delete_groups, memo.config.pushgateway_url, namespace, name)


async def _create(body: kopf.Body, status: kopf.Status, memo: kopf.Memo) -> dict[str, Any]:
    """Check the spec and create the children; the status changes to write. The
    reconcile timer calls it again while names the children need are held by objects
    of another owner."""
    name, namespace = body.meta.name or "", body.meta.namespace or "default"
    current = FineTuneJobStatus.model_validate(dict(status))
    generation = int(body.meta.get("generation") or 1)
    try:
        # A try after the first wrote the job file: the job trains with that spec, a
        # later edit ignored (`SpecChangeIgnored`), so the children are built from it.
        job = await _accepted(memo, body, namespace) or FineTuneJob.model_validate(
            _document(name, namespace, body.spec)
        )
    except ValidationError as exc:
        message = "; ".join(str(p) for p in problems_from(exc))
        reconcile.unbuildable(current, generation, "InvalidSpec", message, _now())
        kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
        metrics.FAILURES.labels("InvalidSpec").inc()
        return _status_patch(dict(status), current)
    children = builders.children(job, current.attempt, memo.config)
    try:
        _, held = await _create_own(body, namespace, children, memo.cluster)
    except RefusedError as refused:
        _rejected(body, current, generation, refused)
        return _status_patch(dict(status), current)
    except ForbiddenError as forbidden:
        message = f"{forbidden}; trying again"
        _waiting_to_create(body, current, generation, "Forbidden", message)
        return _status_patch(dict(status), current)
    if held:
        reason, message = _held_message(name, held)
        _waiting_to_create(body, current, generation, reason, message)
        return _status_patch(dict(status), current)
    memo.accepted = job
    batch_job = children[-1]["metadata"]["name"]
    reconcile.created(current, generation, batch_job, _now())
    kopf.event(body, type="Normal", reason="Created", message=f"created Job {batch_job}")
    return _status_patch(dict(status), current)


def _waiting_to_create(
    body: kopf.Body, status: FineTuneJobStatus, generation: int, reason: str, message: str
) -> None:
    """Pending with Created=False, and one Warning event each time the reason changes."""
    before = reconcile.find_condition(status, ConditionType.CREATED)
    reconcile.waiting_to_create(status, generation, reason, message, _now())
    if before is None or (before.reason, before.message) != (reason, message):
        kopf.event(body, type="Warning", reason=reason, message=message)


def _rejected(
    body: kopf.Body, status: FineTuneJobStatus, generation: int, refused: RefusedError
) -> None:
    """Fail the job whose child the API refused, with the API's message."""
    reconcile.unbuildable(status, generation, "Rejected", str(refused), _now())
    kopf.event(body, type="Warning", reason="Rejected", message=str(refused))
    metrics.FAILURES.labels("Rejected").inc()


Held = list[tuple[dict[str, Any], dict[str, Any]]]  # a child, and the object holding its name


async def _create_own(
    body: kopf.Body, namespace: str, children: list[dict[str, Any]], cluster: Cluster
) -> tuple[list[dict[str, Any]], Held]:
    """Create the children, adopted: those created now (not there already), and those
    whose name an object of another owner holds. The Job (last) only once all the
    others are this job's: its pods would mount another job's job file."""
    created: list[dict[str, Any]] = []
    held: Held = []
    for child in children:
        if child["kind"] == "Job" and held:
            break
        kopf.adopt(child, owner=body)
        existing = await in_thread(cluster.create, namespace, child)
        if existing is None:
            created.append(child)
        elif not ownership.owned([{"metadata": existing}], body.meta.uid):
            held.append((child, existing))
    return created, held


def _held_message(name: str, held: Held) -> tuple[str, str]:
    """The Created condition's reason and message while names are held."""
    previous, others = [], []
    for child, existing in held:
        what = f"{child['kind']} {child['metadata']['name']}"
        of_previous, owner = ownership.holder(existing, KIND, name)
        if of_previous:
            previous.append(what)
        else:
            others.append(f"{what} exists and is not this job's (its owner: {owner})")
    parts = []
    if previous:
        parts.append(
            f"waiting for the previous FineTuneJob {name}'s {', '.join(previous)} to be "
            "deleted (the garbage collector removes them); this job creates its own then"
        )
    if others:
        parts.append("; ".join(others) + ": delete it, or give this job another name")
    return ("NameTaken" if others else "WaitingForPreviousJob"), "; ".join(parts)


@kopf.on.update(*RESOURCE, field="spec")
def spec_changed(body: kopf.Body, old: Any, new: Any, **_: Any) -> None:
    applied, ignored = spec_changes.split(old, new)
    if ignored:
        kopf.event(
            body,
            type="Warning",
            reason="SpecChangeIgnored",
            message=f"{', '.join(ignored)} cannot change once a job is created; it keeps "
            "its original spec. Delete and recreate the job to train with the new one.",
        )
    if applied:
        kopf.event(body, type="Normal", reason="RunPolicyUpdated", message=", ".join(applied))


async def _accepted(memo: kopf.Memo, body: kopf.Body, namespace: str) -> FineTuneJob | None:
    """The spec the job was created with, from its job file (the ConfigMap)."""
    accepted: FineTuneJob | None = getattr(memo, "accepted", None)
    if accepted is None:
        config_map = Names(body.meta.name or "").config_map
        text = await in_thread(memo.cluster.job_file, namespace, config_map, body.meta.uid)
        if text is None:
            return None
        accepted = FineTuneJob.model_validate(yaml.safe_load(text))
        memo.accepted = accepted
    return accepted


async def _fail_unbuildable(
    memo: kopf.Memo,
    body: kopf.Body,
    status: Any,
    current: FineTuneJobStatus,
    generation: int,
    reason: str,
    message: str,
) -> None:
    """Fail a created job whose next attempts cannot be built, saying why everywhere."""
    reconcile.unbuildable(current, generation, reason, message, _now())
    memo.decided = current
    kopf.event(body, type="Warning", reason="Failed", message=f"{reason}: {message}")
    metrics.FAILURES.labels(reason).inc()
    await _write_status(memo, body, _status_patch(dict(status), current))


async def _restore_job_file(
    body: kopf.Body, generation: int, memo: kopf.Memo, namespace: str
) -> FineTuneJob | None:
    """The job file is gone (deleted by hand) or not this job's, and this process does
    not know the spec the job was created with (it restarted). A spec unchanged since
    (generation 1) is that spec: write the job file again from it, unless a ConfigMap
    not this job's holds its name (it is not overwritten). None otherwise; a spec this
    operator's checks refuse raises `ValidationError`."""
    name = body.meta.name or ""
    if generation != 1:
        return None
    job = FineTuneJob.model_validate(_document(name, namespace, body.spec))
    _, held = await _create_own(body, namespace, [builders.config_map(job)], memo.cluster)
    if held:
        return None
    memo.accepted = job
    kopf.event(
        body,
        type="Warning",
        reason="JobFileRecreated",
        message=f"ConfigMap {Names(name).config_map}, the job file, was missing (deleted "
        "by hand?): wrote it again from the spec, unchanged since the job was created",
    )
    return job


def _live_policy(live_spec: Any) -> RunPolicy:
    """The run policy as the spec says it now; the defaults when it does not validate
    (a job that failed with InvalidSpec still gets its TTL)."""
    try:
        return RunPolicy.model_validate(dict(live_spec.get("runPolicy") or {}))
    except ValidationError:
        return RunPolicy()


def _policy(accepted: FineTuneJob, live_spec: Any) -> RunPolicy:
    """The accepted run policy with the knobs that may change taken from the live spec."""
    live = dict(live_spec.get("runPolicy") or {})
    mutable = {path.rsplit(".", 1)[1] for path in spec_changes.MUTABLE}
    base = accepted.spec.run_policy.model_dump(by_alias=True, exclude_none=True)
    merged = base | {k: v for k, v in live.items() if k in mutable}
    for key in mutable - set(live):
        merged.pop(key, None)
    try:
        return RunPolicy.model_validate(merged)
    except ValidationError:
        return accepted.spec.run_policy


async def _act(
    action: reconcile.Action,
    body: kopf.Body,
    accepted: FineTuneJob,
    policy: RunPolicy,
    memo: kopf.Memo,
) -> None:
    cluster: Cluster = memo.cluster
    name, namespace = body.meta.name or "", body.meta.namespace or "default"
    names = Names(name)
    match action:
        case reconcile.StopAttempt(attempt=attempt):
            await in_thread(cluster.delete_job, namespace, names.batch_job(attempt))
        case reconcile.StartAttempt(attempt=attempt, deadline_seconds=deadline, missing=missing):
            spec = accepted.spec.model_copy(update={"run_policy": policy})
            job = builders.batch_job(
                accepted.model_copy(update={"spec": spec}), attempt, memo.config, deadline
            )
            # Every child, not the Job alone: without one deleted by hand (the job file
            # its pods mount, the Service its ranks find each other by) the new attempt
            # would wait forever. Those still there cost a request each.
            children = [*builders.children(accepted, attempt, memo.config)[:-1], job]
            try:
                created, held = await _create_own(body, namespace, children, cluster)
            except ForbiddenError as forbidden:
                if getattr(memo, "forbidden", None) != str(forbidden):
                    message = f"{forbidden}; trying again"
                    kopf.event(body, type="Warning", reason="Forbidden", message=message)
                memo.forbidden = str(forbidden)
                raise
            # The Job of an attempt first forbidden is no Job deleted by hand.
            missing = missing and getattr(memo, "forbidden", None) is None
            memo.forbidden = None
            reason, message = _held_message(name, held) if held else ("", "")
            made_again = [f"{c['kind']} {c['metadata']['name']}" for c in created if c is not job]
            if held and getattr(memo, "held", None) != message:
                memo.held = message  # one event, not one per tick
                kopf.event(body, type="Warning", reason=reason, message=message)
            if made_again:
                kopf.event(
                    body,
                    type="Warning",
                    reason="ChildrenRecreated",
                    message=f"{', '.join(made_again)} missing (deleted by hand?): created "
                    f"again from the spec the job was created with, for attempt {attempt}",
                )
            if missing and any(c is job for c in created):
                kopf.event(
                    body,
                    type="Warning",
                    reason="JobRecreated",
                    message=f"Job {names.batch_job(attempt)} was deleted; created it again "
                    f"(attempt {attempt}, not counted as a restart): its gang starts over "
                    "from the last checkpoint",
                )
        case reconcile.SuspendAttempt(attempt=attempt, suspend=suspend):
            await in_thread(cluster.suspend_job, namespace, names.batch_job(attempt), suspend)
        case reconcile.SetDeadline(attempt=attempt, seconds=seconds, limit=limit):
            annotations = {builders.DEADLINE_ANNOTATION: str(limit or "")}
            await in_thread(
                cluster.set_job_deadline, namespace, names.batch_job(attempt), seconds, annotations
            )
        case reconcile.DeleteFineTuneJob():
            await in_thread(cluster.delete_finetunejob, namespace, name)


def _announce_checkpoint(body: kopf.Body, status: FineTuneJobStatus, memo: kopf.Memo) -> None:
    """A CheckpointSaved event when the trainer reports a newer checkpoint. The first
    one this process sees is taken as known: a restarted operator repeats nothing."""
    checkpoint = status.last_checkpoint
    step = checkpoint.step if checkpoint is not None else None
    if not hasattr(memo, "announced"):
        memo.announced = step
    elif checkpoint is not None and step != memo.announced:
        memo.announced = step
        kopf.event(
            body,
            type="Normal",
            reason="CheckpointSaved",
            message=f"step {checkpoint.step}: {checkpoint.uri}",
        )


def _behind(current: FineTuneJobStatus, decided: FineTuneJobStatus) -> bool:
    """Whether `current` predates `decided`, the status of this process's last tick
    that acted (finished the job, or started a new attempt)."""
    if decided.phase in reconcile.FINISHED:
        return current.phase not in reconcile.FINISHED
    return current.attempt < decided.attempt


@kopf.timer(*RESOURCE, interval=CONFIG.reconcile_seconds)
async def reconcile_job(
    body: kopf.Body,
    name: str,
    namespace: str | None,
    meta: kopf.Meta,
    spec: kopf.Spec,
    status: kopf.Status,
    memo: kopf.Memo,
    **kwargs: Any,  # kopf passes the indexes by their names
) -> None:
    """One tick. It writes the status itself (`_write_status`), never through kopf's
    `patch`."""
    attempts: kopf.Index[Any, Any] = kwargs["attempts"]
    gang_pods: kopf.Index[Any, Any] = kwargs["gang_pods"]
    if not status.get("phase"):
        return  # the create handler has not finished
    namespace = namespace or "default"
    started = time.perf_counter()
    current = FineTuneJobStatus.model_validate(dict(status))
    generation = int(meta.get("generation") or 1)
    uid = body.meta.uid
    decided: FineTuneJobStatus | None = getattr(memo, "decided", None)
    if decided is not None and _behind(current, decided):
        # The watch has not shown what the last acting tick wrote yet (or the write was
        # lost): acting on this copy would undo that tick, e.g. start the Job it stopped.
        await _write_status(memo, body, _status_patch(dict(status), decided))
        return
    if current.phase in reconcile.FINISHED:
        # Only the TTL is left to watch, and no attempt may go on running.
        for attempt in range(current.attempt + 1):
            for job in ownership.owned(attempts.get((namespace, name, str(attempt)), []), uid):
                if reconcile.job_active(job):
                    await in_thread(memo.cluster.delete_job, namespace, job["metadata"]["name"])
        finished = reconcile.Observed(
            generation=generation,
            nodes=0,
            policy=_live_policy(spec),
            status=current,
            batch_job=None,
            pods=[],
            now=_now(),
        )
        outcome = reconcile.reconcile(finished)
        for action in outcome.actions:
            if isinstance(action, reconcile.DeleteFineTuneJob):
                await in_thread(memo.cluster.delete_finetunejob, namespace, name)
        changes = _status_patch(dict(status), outcome.status)
        await _write_status(memo, body, changes | _stale_progress(dict(status), outcome.status))
        return
    if not reconcile.condition_is(current, ConditionType.CREATED):
        # Its names were held: try again.
        await _write_status(memo, body, await _create(body, status, memo))
        return
    try:
        accepted = await _accepted(memo, body, namespace) or await _restore_job_file(
            body, generation, memo, namespace
        )
    except ValidationError as exc:  # created before this operator's checks refused it
        problems = "; ".join(str(p) for p in problems_from(exc))
        message = (
            f"ConfigMap {Names(name).config_map}, the job file this job was created with, no "
            f"longer passes this operator's checks: {problems}. Delete the job and create it "
            "again with the spec fixed"
        )
        await _fail_unbuildable(memo, body, status, current, generation, "InvalidSpec", message)
        return
    if accepted is None:
        why = (
            "is held by a ConfigMap that is not this job's (replaced by hand?), which is "
            "not overwritten"
            if generation == 1
            else f"is missing or not this job's, and the spec has changed since (generation "
            f"{generation})"
        )
        message = (
            f"ConfigMap {Names(name).config_map}, the job file this job was created with, "
            f"{why}: new attempts could not be built from it. Delete the job and create it "
            "again"
        )
        await _fail_unbuildable(memo, body, status, current, generation, "JobFileMissing", message)
        return
    policy = _policy(accepted, spec)
    # Only this job's Job, and only that Job's pods: a previous job of this name, or a
    # Job deleted by hand, leaves objects with the same labels for a while.
    key = (namespace, name, str(current.attempt))
    batch_job = next(iter(ownership.owned(attempts.get(key, []), uid)), None)
    job_uid = batch_job["metadata"]["uid"] if batch_job is not None else None
    pods = ownership.owned(gang_pods.get(key, []), job_uid)
    nodes = accepted.spec.resources.nodes
    refused = None
    if batch_job is not None and reconcile.job_active(batch_job) and gang.read(pods, nodes).missing:
        # Pods the Job controller has not made: it may be refused (a quota, an admission
        # policy), which it tells only in events on the Job.
        job_name = batch_job["metadata"]["name"]
        refused = await in_thread(memo.cluster.creation_refused, namespace, job_name, job_uid)
    observed = reconcile.Observed(
        generation=generation,
        nodes=nodes,
        policy=policy,
        status=current,
        batch_job=batch_job,
        pods=pods,
        now=_now(),
        creation_refused=refused,
    )
    outcome = reconcile.reconcile(observed)
    _announce_checkpoint(body, current, memo)
    try:
        for action in outcome.actions:
            await _act(action, body, accepted, policy, memo)
    except RefusedError as refused:  # a new attempt's Job
        _rejected(body, outcome.status, generation, refused)
    except ForbiddenError as forbidden:  # tried again next tick: the Job is still missing
        message = f"{forbidden}; trying again"
        reconcile.set_condition(
            outcome.status, ConditionType.RUNNING, False, "Forbidden", message, generation, _now()
        )
    if outcome.actions:
        memo.decided = outcome.status
    # Events and metrics first: once the status is written, whoever reads it may look
    # for them (and a refused write is retried from `decided`, which repeats neither).
    _post(body, outcome.events)
    if outcome.status.start_time is not None and current.start_time is None:
        created = reconcile.parse_time(meta.get("creationTimestamp"))
        if created is not None:
            queued = outcome.status.start_time - created
            metrics.QUEUE_SECONDS.observe(max(0.0, queued.total_seconds()))
    if outcome.restarted:
        metrics.RESTARTS.labels(outcome.restarted).inc()
    if outcome.failed:
        metrics.FAILURES.labels(outcome.failed).inc()
    metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
    changes = _status_patch(dict(status), outcome.status)
    await _write_status(memo, body, changes | _stale_progress(dict(status), outcome.status))


@kopf.on.event(*RESOURCE)
def count_phase(type: str, name: str, namespace: str | None, status: kopf.Status, **_: Any) -> None:
    if type == "DELETED":
        metrics.PHASES.gone(namespace or "", name)
    else:
        metrics.PHASES.seen(namespace or "", name, status.get("phase"))
