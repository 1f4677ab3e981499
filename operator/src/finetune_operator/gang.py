"""What a gang attempt's pods are doing, read in one place.

`Job.status.active` counts pods that are still Pending (unschedulable, pulling
their image), so it cannot tell a gang that trains from one that waits for GPUs.
This reads each rank's pod instead: scheduled or not, its container started or
waiting (and why), finished or failed, or being deleted (no member then). Pure: the pods come from the operator's
index, in the shape the API returns them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# A condition reason must be CamelCase; a kubelet's waiting reason normally is.
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
# The steps of a normal start, in order; any other reason a pod waits is a problem.
STARTING = ("CreatingPods", "Scheduling", "ContainerCreating", "PodInitializing")


class RankState(IntEnum):
    """One rank's pod, in the order a replacement pod is preferred over its
    predecessor (a failed pod only counts when nothing newer stands for its rank)."""

    FAILED = 0
    WAITING = 1
    SUCCEEDED = 2
    RUNNING = 3


@dataclass(frozen=True)
class Rank:
    index: int
    state: RankState
    scheduled: bool
    reason: str = ""  # why it waits, or how it failed
    message: str = ""
    pod: str = ""


@dataclass(frozen=True)
class Gang:
    nodes: int
    ranks: dict[int, Rank]

    def count(self, *states: RankState) -> int:
        return sum(rank.state in states for rank in self.ranks.values())

    @property
    def runs(self) -> bool:
        """Every rank's container has started, or finished successfully."""
        return self.count(RankState.RUNNING, RankState.SUCCEEDED) == self.nodes

    @property
    def training(self) -> bool:
        """At least one rank still runs (so its heartbeat is expected)."""
        return self.count(RankState.RUNNING) > 0

    @property
    def leaving(self) -> bool:
        """A rank's pod is being deleted (a lost node's may stay so for ever)."""
        return any(rank.reason == "Terminating" for rank in self.ranks.values())

    @property
    def scheduled(self) -> bool:
        return len(self.ranks) == self.nodes and all(r.scheduled for r in self.ranks.values())

    @property
    def failed(self) -> list[Rank]:
        return [r for r in self.ranks.values() if r.state == RankState.FAILED]

    @property
    def missing(self) -> int:
        """Ranks without a pod: not created yet, or refused (`creation_refused`)."""
        return self.nodes - len(self.ranks)

    def waiting(self, creation_refused: str | None = None) -> tuple[str, str]:
        """Why a gang that does not run waits: the reason of its rank furthest from
        running. Pods the API refuses to create (`creation_refused`: the Job
        controller's last FailedCreate message) come first, then a problem
        (Unschedulable, then e.g. ImagePullBackOff) before a normal step, and pods not
        created yet before the steps of created ones."""
        missing = self.missing
        if missing and creation_refused:
            return (
                "FailedCreate",
                f"{missing} of {self.nodes} pods cannot be created: {creation_refused}",
            )
        waiting = [r for r in self.ranks.values() if r.state == RankState.WAITING]
        if missing and all(r.reason in STARTING for r in waiting):
            return "CreatingPods", f"{missing} of {self.nodes} pods not created yet"
        rank = min(waiting, key=_urgency)
        detail = f": {rank.message}" if rank.message else ""
        count = len(waiting) + missing
        return rank.reason, f"{count} of {self.nodes} pods waiting; rank {rank.index}{detail}"


def _urgency(rank: Rank) -> tuple[int, int]:
    if rank.reason == "Unschedulable":
        return -2, rank.index
    if rank.reason not in STARTING:
        return -1, rank.index
    return STARTING.index(rank.reason), rank.index


def _condition(pod: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == type_:
            return dict(condition)
    return None


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("status", {}).get("containerStatuses") or [])


def _reason(value: Any, fallback: str) -> str:
    text = str(value or "")
    return text if _REASON.match(text) else fallback


def read_rank(pod: dict[str, Any], index: int) -> Rank:
    name = str(pod.get("metadata", {}).get("name", ""))
    phase = pod.get("status", {}).get("phase")
    containers = _containers(pod)
    if phase == "Succeeded":
        return Rank(index, RankState.SUCCEEDED, True, pod=name)
    if phase == "Failed":
        return Rank(index, RankState.FAILED, True, pod=name)
    scheduled_condition = _condition(pod, "PodScheduled")
    scheduled = phase == "Running" or (
        scheduled_condition is not None and scheduled_condition.get("status") == "True"
    )
    if pod.get("metadata", {}).get("deletionTimestamp"):
        # Stopping for its grace period (preempted, drained, its Job deleted): no member.
        message = f"pod {name} is being deleted"
        return Rank(index, RankState.WAITING, scheduled, "Terminating", message, name)
    if not scheduled:
        if scheduled_condition is not None and scheduled_condition.get("reason"):
            reason = _reason(scheduled_condition.get("reason"), "Unschedulable")
            message = str(scheduled_condition.get("message") or "")
            return Rank(index, RankState.WAITING, False, reason, message, name)
        return Rank(index, RankState.WAITING, False, "Scheduling", "not scheduled yet", name)
    if phase == "Running" and (
        not containers or any("running" in (c.get("state") or {}) for c in containers)
    ):
        return Rank(index, RankState.RUNNING, True, pod=name)
    for container in containers:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting:
            reason = _reason(waiting.get("reason"), "ContainerWaiting")
            return Rank(
                index, RankState.WAITING, True, reason, str(waiting.get("message") or ""), name
            )
    return Rank(index, RankState.WAITING, True, "ContainerCreating", "", name)


def read(pods: list[dict[str, Any]], nodes: int) -> Gang:
    """The gang of `nodes` ranks from its pods; the most advanced pod stands for a rank."""
    ranks: dict[int, Rank] = {}
    for pod in pods:
        index_text = (pod.get("metadata", {}).get("annotations") or {}).get(COMPLETION_INDEX)
        if index_text is None or not str(index_text).isdigit():
            continue
        rank = read_rank(pod, int(index_text))
        known = ranks.get(rank.index)
        if known is None or rank.state > known.state:
            ranks[rank.index] = rank
    return Gang(nodes, ranks)
