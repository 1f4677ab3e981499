"""The few Kubernetes API calls the operator makes, through the official client.

Creation is idempotent (a child that already exists is left as it is, and its
metadata returned so the caller can tell whose it is), so a handler retried after
an operator restart never makes duplicates: children have names derived from the
job's, and the API refuses a second object of a name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kubernetes
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from finetune.api import GROUP, VERSION
from finetune.api.job import PLURAL

from . import ownership
from .connection import connect as connect  # where the handlers have always found it

Manifest = dict[str, Any]

BACKGROUND = {"propagationPolicy": "Background"}


class RefusedError(Exception):
    """The API refused to create a child as invalid (422): the same spec gets the same
    answer every time, so trying again cannot help."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        super().__init__(f"the API refused {kind} {name}: {message}")


class ForbiddenError(Exception):
    """The API forbade creating a child (403): an admission policy, a quota on the
    number of objects, the operator's RBAC. The cluster's admins may change that, so
    it is tried again."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        super().__init__(f"the API forbade {kind} {name}: {message}")


def api_message(exc: ApiException) -> str:
    """The message of the API's Status in `exc` (it names the field), or its reason."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.body or exc.reason)


class Cluster:
    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def _creator(self, kind: str) -> Callable[..., Any]:
        creators: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
        }
        return creators[kind]

    def _reader(self, kind: str) -> Callable[..., Any]:
        readers: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "Service": self.core.read_namespaced_service,
            "ServiceAccount": self.core.read_namespaced_service_account,
            "Role": self.rbac.read_namespaced_role,
            "RoleBinding": self.rbac.read_namespaced_role_binding,
            "Job": self.batch.read_namespaced_job,
        }
        return readers[kind]

    def create(self, namespace: str, manifest: Manifest) -> Manifest | None:
        """Create `manifest`; None when created, else the metadata of the object that
        already has its name (read back: it may not be ours). Raises `RefusedError` when the
        API finds it invalid, `ForbiddenError` when it forbids it."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        while True:
            try:
                self._creator(kind)(namespace, manifest)
            except ApiException as exc:
                if exc.status == 422:
                    raise RefusedError(kind, name, api_message(exc)) from exc
                if exc.status == 403:
                    raise ForbiddenError(kind, name, api_message(exc)) from exc
                if exc.status != 409:
                    raise
            else:
                return None
            try:
                existing = self._reader(kind)(name, namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                continue  # deleted in between: the name is free now
            meta: Manifest = self.client.sanitize_for_serialization(existing.metadata)
            return meta

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete an attempt's Job and, through the garbage collector, its pods."""
        try:
            self.batch.delete_namespaced_job(name, namespace, body=BACKGROUND)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def annotate_job(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        """Add `annotations` to a Job; nothing when it is gone."""
        self._patch_job(namespace, name, {"metadata": {"annotations": annotations}})

    def set_job_deadline(
        self, namespace: str, name: str, seconds: int | None, annotations: dict[str, str]
    ) -> None:
        """Set (None: remove) a Job's activeDeadlineSeconds, which stays mutable while
        it runs, with `annotations` saying what it was made from; nothing when it is gone."""
        body = {
            "metadata": {"annotations": annotations},
            "spec": {"activeDeadlineSeconds": seconds},
        }
        self._patch_job(namespace, name, body)

    def _patch_job(self, namespace: str, name: str, body: Manifest) -> None:
        try:
            self.batch.patch_namespaced_job(name, namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def suspend_job(self, namespace: str, name: str, suspend: bool) -> None:
        self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})

    def creation_refused(self, namespace: str, job_name: str, job_uid: str) -> str | None:
        """Why the Job controller cannot create the pods of Job `job_name` (of `job_uid`),
        in its newest FailedCreate event: "exceeded quota: ...", "violates PodSecurity
        ...", a missing ServiceAccount. None when it has said nothing."""
        selector = f"involvedObject.kind=Job,involvedObject.name={job_name},reason=FailedCreate"
        found = self.core.list_namespaced_event(namespace, field_selector=selector).items
        # The selector narrows the list on a real API server; the uid tells this Job's
        # events from those of an earlier Job of its name.
        refusals = [
            e
            for e in found
            if e.reason == "FailedCreate" and e.involved_object.uid == job_uid and e.message
        ]
        if not refusals:
            return None
        newest = max(refusals, key=_event_time)
        return str(newest.message)

    def job_file(self, namespace: str, config_map: str, owner_uid: str) -> str | None:
        """The job file in `config_map`; None when it is missing or not the owner's."""
        try:
            found = self.core.read_namespaced_config_map(config_map, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        meta = self.client.sanitize_for_serialization(found.metadata)
        if not ownership.owned([{"metadata": meta}], owner_uid):
            return None
        data: dict[str, str] = found.data or {}
        return next(iter(data.values()), None)

    def patch_finetunejob_status(self, namespace: str, name: str, status: Manifest) -> None:
        """Merge `status` into the FineTuneJob's status (None clears a field)."""
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        )

    def delete_finetunejob(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _event_time(event: Any) -> datetime:
    """When an event last happened: the Job controller's recorder updates lastTimestamp
    as the same refusal repeats; newer recorders may set only eventTime."""
    moment = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
    return moment or datetime.min.replace(tzinfo=UTC)


async def in_thread(call: Callable[..., Any], *args: Any) -> Any:
    """The client is synchronous: keep its calls off kopf's event loop."""
    return await asyncio.to_thread(call, *args)
