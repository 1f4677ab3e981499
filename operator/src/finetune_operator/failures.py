"""Why a gang attempt failed, and whether trying again can help.

Read from the pods of the failed attempt: the container's exit code (the
trainer's codes are the pod contract's, `finetune.api.pod`), the kubelet's OOMKilled, and
the DisruptionTarget condition Kubernetes sets when it removes a pod for its
own reasons (preemption, node loss, eviction).

- permanent: the same input fails the same way again (bad data, NaN loss, a
  refused credential, out of memory). No retry; the reason goes in status.
- disruption: the cluster took the pod away. Retried, not counted against
  backoffLimit.
- error: anything else. Retried, counted.

A pod the cluster takes away is deleted, and the Job controller lets it go before
it marks the Job Failed: when the operator reads the failed attempt, the victim
may be gone and only its peers' broken collectives left. So a disruption is
remembered on the attempt's Job (an annotation, `remember`) when it is first seen,
and the Job's pod failure policy fails it on a DisruptionTarget pod with that
cause in its own condition; `classify` reads both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from finetune.api.pod import (
    EXIT_ACCESS_DENIED,
    EXIT_DISK_FULL,
    EXIT_INVALID_INPUT,
    EXIT_NON_FINITE_LOSS,
)

PERMANENT_EXIT_CODES = {
    EXIT_INVALID_INPUT: ("InvalidInput", "the trainer refused its input"),
    EXIT_NON_FINITE_LOSS: ("NonFiniteLoss", "the training loss became NaN or infinite"),
    EXIT_ACCESS_DENIED: ("AccessDenied", "S3 or the model hub refused the credentials"),
    EXIT_DISK_FULL: ("DiskFull", "the pod's disk filled up while saving; raise its size"),
}

# DisruptionTarget reasons, and the pod-level reasons older kubelets set.
DISRUPTIONS = {
    "PreemptionByScheduler": "Preempted",
    "PreemptionByKubeScheduler": "Preempted",
    "DeletionByTaintManager": "NodeLost",
    "DeletionByPodGC": "NodeLost",
    "TerminationByKubelet": "NodeShutdown",
    "EvictionByEvictionAPI": "Evicted",
}
POD_REASONS = {
    "NodeLost": "NodeLost",
    "Evicted": "Evicted",
    "Shutdown": "NodeShutdown",
    "NodeShutdown": "NodeShutdown",
    "Terminated": "NodeShutdown",
    "Preempting": "Preempted",
}

PERMANENT_REASONS = ("OOMKilled", *(reason for reason, _ in PERMANENT_EXIT_CODES.values()))
DISRUPTION_REASONS = tuple(sorted({*DISRUPTIONS.values(), *POD_REASONS.values(), "Disrupted"}))


class Kind(Enum):
    PERMANENT = "permanent"
    DISRUPTION = "disruption"
    ERROR = "error"


@dataclass(frozen=True)
class Failure:
    kind: Kind
    reason: str  # CamelCase, for status and events
    message: str

    @property
    def permanent(self) -> bool:
        return self.kind is Kind.PERMANENT

    @property
    def counted(self) -> bool:
        """Counts against backoffLimit."""
        return self.kind is Kind.ERROR


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for container in pod.get("status", {}).get("containerStatuses") or []:
        state = container.get("state", {}).get("terminated")
        if state and state.get("exitCode", 0) != 0:
            return dict(state)
    return None


def _disruption(pod: dict[str, Any]) -> str | None:
    status = pod.get("status", {})
    for condition in status.get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return DISRUPTIONS.get(condition.get("reason", ""), "Disrupted")
    return POD_REASONS.get(status.get("reason", ""))


def disruption_of(pod: dict[str, Any]) -> Failure | None:
    """The cluster's taking the pod away, whatever its phase (a preempted pod is
    marked before it stops), or None."""
    if (disruption := _disruption(pod)) is None:
        return None
    name = pod.get("metadata", {}).get("name", "?")
    return Failure(Kind.DISRUPTION, disruption, f"pod {name}: {disruption}")


def of_pod(pod: dict[str, Any]) -> Failure | None:
    """What a failed pod tells, or None when it did not fail."""
    name = pod.get("metadata", {}).get("name", "?")
    if (disruption := disruption_of(pod)) is not None:
        return disruption
    if pod.get("status", {}).get("phase") != "Failed":
        return None
    terminated = _terminated(pod)
    if terminated is None:
        return Failure(Kind.ERROR, "PodFailed", f"pod {name} failed")
    code = int(terminated.get("exitCode", 1))
    detail = (terminated.get("message") or "").strip()
    if terminated.get("reason") == "OOMKilled":
        return Failure(
            Kind.PERMANENT,
            "OOMKilled",
            f"pod {name} ran out of memory: lower training.batchSize, turn on "
            "training.gradientCheckpointing, or raise resources.memory",
        )
    if code in PERMANENT_EXIT_CODES:
        reason, default = PERMANENT_EXIT_CODES[code]
        return Failure(Kind.PERMANENT, reason, f"pod {name}: {detail or default}")
    signal = f" (signal {code - 128})" if code > 128 else ""
    return Failure(
        Kind.ERROR,
        "TrainerError",
        f"pod {name}: the trainer exited with code {code}{signal}"
        + (f": {detail}" if detail else ""),
    )


# The attempt's Job carries the disruption seen on one of its pods, as JSON.
DISRUPTION_ANNOTATION = "finetune.dev/disruption"
# The Job's own rule: a pod the cluster takes away fails the Job with this reason and
# a message naming the condition, whether or not the pod is still there to read.
POD_FAILURE_POLICY = {
    "rules": [
        {
            "action": "FailJob",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        }
    ]
}
_POLICY_REASON = "PodFailurePolicy"


def remember(failure: Failure) -> dict[str, str]:
    """The annotation that keeps a disruption on the attempt's Job."""
    value = json.dumps({"reason": failure.reason, "message": failure.message})
    return {DISRUPTION_ANNOTATION: value}


def remembered(job: dict[str, Any] | None) -> Failure | None:
    """The disruption kept on the attempt's Job, if any."""
    annotations = (job or {}).get("metadata", {}).get("annotations") or {}
    try:
        kept = json.loads(annotations[DISRUPTION_ANNOTATION])
        return Failure(Kind.DISRUPTION, str(kept["reason"]), str(kept["message"]))
    except (KeyError, TypeError, ValueError):
        return None


def classify(
    pods: list[dict[str, Any]],
    job_failed: dict[str, Any] | None = None,
    job: dict[str, Any] | None = None,
) -> Failure:
    """The cause of a failed attempt, from its pods, the Job's Failed condition
    (`job_failed`) and the disruption remembered on the Job. In a gang one rank's loss
    breaks the others' collectives, so a disruption anywhere explains errors
    elsewhere; a permanent failure anywhere explains everything."""
    condition = job_failed or {}
    message = str(condition.get("message") or "")
    failures = [f for f in map(of_pod, sorted(pods, key=_index)) if f is not None]
    if (kept := remembered(job)) is not None:
        failures.append(kept)
    if condition.get("reason") == _POLICY_REASON and "DisruptionTarget" in message:
        failures.append(Failure(Kind.DISRUPTION, "Disrupted", message))
    for kind in (Kind.PERMANENT, Kind.DISRUPTION, Kind.ERROR):
        for failure in failures:
            if failure.kind is kind:
                return failure
    return Failure(Kind.ERROR, "JobFailed", message or "the Job failed with no failed pod left")


def _index(pod: dict[str, Any]) -> int:
    annotations = pod.get("metadata", {}).get("annotations") or {}
    return int(annotations.get("batch.kubernetes.io/job-completion-index", 0))
