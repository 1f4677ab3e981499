"""Pure functions from a FineTuneJob to the Kubernetes objects that run it.

No API calls here: the handlers adopt what these return (ownerReferences) and
create it. Each pod of the Indexed Job is one node of the DeepSpeed gang and
runs `finetune train` on the job file mounted from the ConfigMap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml

from finetune.api import API_VERSION, KIND, FineTuneJob, pod
from finetune.api.common import is_hub
from finetune.api.training import model_uris

from .config import OperatorConfig
from .failures import POD_FAILURE_POLICY

Manifest = dict[str, Any]

LABEL_JOB = "finetune.dev/job"
LABEL_ATTEMPT = "finetune.dev/attempt"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The runPolicy.activeDeadlineSeconds an attempt's Job deadline was made from ("" for
# none): a changed policy moves the live Job's deadline by the difference.
DEADLINE_ANNOTATION = "finetune.dev/active-deadline-seconds"
TRAINER_UID = 1000


@dataclass(frozen=True)
class Names:
    """Every child's name, derived from the job's (which the API keeps short)."""

    job: str

    @property
    def config_map(self) -> str:
        return f"{self.job}-config"

    @property
    def service(self) -> str:
        return f"{self.job}-gang"

    @property
    def service_account(self) -> str:
        return f"{self.job}-trainer"

    def batch_job(self, attempt: int) -> str:
        return f"{self.job}-a{attempt}"

    def master_address(self, attempt: int) -> str:
        # An Indexed Job's pod N is named <job>-N in DNS under the subdomain.
        return f"{self.batch_job(attempt)}-0.{self.service}"


def _labels(job: FineTuneJob, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/managed-by": "finetune-operator",
        LABEL_JOB: job.metadata.name,
        **extra,
    }


def _meta(job: FineTuneJob, name: str, **labels: str) -> Manifest:
    meta: Manifest = {"name": name, "labels": _labels(job, **labels)}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    return meta


def config_map(job: FineTuneJob) -> Manifest:
    """The job file the trainer reads: exactly the user's spec, defaults resolved."""
    document = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace},
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, Names(job.metadata.name).config_map),
        "data": {pod.JOB_FILE: yaml.safe_dump(document, sort_keys=False)},
    }


def headless_service(job: FineTuneJob) -> Manifest:
    """Stable DNS names for the gang's pods; rank 0 is the rendezvous master."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, Names(job.metadata.name).service),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB: job.metadata.name},
            # Ranks must find each other before any of them is ready.
            "publishNotReadyAddresses": True,
            "ports": [
                {
                    "name": "rendezvous",
                    "port": pod.RENDEZVOUS_PORT,
                    "targetPort": pod.RENDEZVOUS_PORT,
                }
            ],
        },
    }


def service_account(job: FineTuneJob) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(job, Names(job.metadata.name).service_account),
        "automountServiceAccountToken": True,
    }


def role(job: FineTuneJob) -> Manifest:
    """The trainer may read its own FineTuneJob and patch its status, nothing else."""
    name = job.metadata.name
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(job, Names(name).service_account),
        "rules": [
            {
                "apiGroups": ["finetune.dev"],
                "resources": ["finetunejobs"],
                "resourceNames": [name],
                "verbs": ["get"],
            },
            {
                "apiGroups": ["finetune.dev"],
                "resources": ["finetunejobs/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            },
        ],
    }


def role_binding(job: FineTuneJob) -> Manifest:
    names = Names(job.metadata.name)
    subject: Manifest = {"kind": "ServiceAccount", "name": names.service_account}
    if job.metadata.namespace:
        subject["namespace"] = job.metadata.namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(job, names.service_account),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": names.service_account,
        },
        "subjects": [subject],
    }


def _environment(job: FineTuneJob, attempt: int, settings: OperatorConfig) -> list[Manifest]:
    spec, names = job.spec, Names(job.metadata.name)
    resources = spec.resources
    env: list[Manifest] = [
        {"name": pod.NNODES_ENV, "value": str(resources.nodes)},
        {"name": pod.NPROC_PER_NODE_ENV, "value": str(max(1, resources.gpus_per_node))},
        {"name": pod.MASTER_ADDR_ENV, "value": names.master_address(attempt)},
        {"name": pod.MASTER_PORT_ENV, "value": str(pod.RENDEZVOUS_PORT)},
        {"name": pod.CACHE_DIR_ENV, "value": pod.CACHE_DIR},
        {"name": "HOME", "value": f"{pod.CACHE_DIR}/home"},
        {"name": pod.JOB_NAME_ENV, "value": job.metadata.name},
        {"name": pod.ATTEMPT_ENV, "value": str(attempt)},
        {
            "name": pod.NAMESPACE_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
    ]
    if settings.pushgateway_url:
        env.append({"name": pod.PUSHGATEWAY_URL_ENV, "value": settings.pushgateway_url})
    if any(is_hub(uri) for uri in model_uris(spec)):
        # The trainer image is offline by default; a job naming a hub model (the
        # evaluators' defaults among them) allows it.
        env.append({"name": pod.HF_HUB_OFFLINE_ENV, "value": "0"})
    # Secrets by reference only: their values never pass through the operator. Each
    # model's token reaches that model's download.
    tokens = [
        (pod.HF_TOKEN_ENV, spec.base_model),
        (pod.TEACHER_HF_TOKEN_ENV, spec.lcm.teacher_model if spec.lcm else None),
    ]
    for name, source in tokens:
        if source is not None and source.hub_token_secret_ref is not None:
            ref = source.hub_token_secret_ref
            env.append(
                {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            )
    return env


def _pod_spec(job: FineTuneJob, attempt: int, settings: OperatorConfig) -> Manifest:
    spec, names = job.spec, Names(job.metadata.name)
    resources = spec.resources
    limits: dict[str, str] = {}
    if resources.gpus_per_node:
        limits[resources.gpu_resource_name] = str(resources.gpus_per_node)
    if resources.cpu:
        limits["cpu"] = resources.cpu
    if resources.memory:
        limits["memory"] = resources.memory
    container: Manifest = {
        "name": "trainer",
        "image": resources.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["finetune", "train", f"{pod.CONFIG_DIR}/{pod.JOB_FILE}"],
        "env": _environment(job, attempt, settings),
        "ports": [
            {"name": "rendezvous", "containerPort": pod.RENDEZVOUS_PORT},
            {"name": "metrics", "containerPort": pod.TRAINER_METRICS_PORT},
        ],
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": [
            {"name": "config", "mountPath": pod.CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": pod.CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.output.credentials_secret_ref is not None:
        container["envFrom"] = [{"secretRef": {"name": spec.output.credentials_secret_ref.name}}]
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "subdomain": names.service,
        "serviceAccountName": names.service_account,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Time for SIGTERM's clean stop: finish the step and save a checkpoint.
        "terminationGracePeriodSeconds": 300,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": names.config_map}},
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": resources.shared_memory},
            },
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if resources.node_selector:
        pod_spec["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True, mode="json")
            for t in resources.tolerations
        ]
    if resources.affinity:
        pod_spec["affinity"] = resources.affinity
    pull_secrets = [s.name for s in resources.image_pull_secrets]
    pull_secrets += [name for name in settings.trainer_pull_secrets if name not in pull_secrets]
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in pull_secrets]
    if spec.run_policy.priority_class_name:
        pod_spec["priorityClassName"] = spec.run_policy.priority_class_name
    return pod_spec


def batch_job(
    job: FineTuneJob,
    attempt: int,
    settings: OperatorConfig | None = None,
    deadline_seconds: int | None = None,
) -> Manifest:
    """One attempt of the gang: an Indexed Job with a pod per node.

    Its own backoffLimit is 0: DeepSpeed ranks cannot rejoin a running gang, so
    the operator restarts the whole gang as a new attempt instead. Its pod failure
    policy fails it at once, naming the cause, when the cluster takes a pod away.
    A restarted attempt gets what is left of `activeDeadlineSeconds` (`deadline_seconds`).
    """
    settings = settings or OperatorConfig()
    spec, names = job.spec, Names(job.metadata.name)
    policy = spec.run_policy
    labels = {LABEL_ATTEMPT: str(attempt)}
    if policy.queue_name:
        labels[KUEUE_QUEUE_LABEL] = policy.queue_name
    job_spec: Manifest = {
        "completionMode": "Indexed",
        "completions": spec.resources.nodes,
        "parallelism": spec.resources.nodes,
        "backoffLimit": 0,
        "podFailurePolicy": copy.deepcopy(POD_FAILURE_POLICY),
        # With a Kueue queue the Job starts suspended and Kueue admits it.
        "suspend": policy.suspend or policy.queue_name is not None,
        "template": {
            "metadata": {"labels": _labels(job, **{LABEL_ATTEMPT: str(attempt)})},
            "spec": _pod_spec(job, attempt, settings),
        },
    }
    deadline = deadline_seconds or policy.active_deadline_seconds
    if deadline:
        job_spec["activeDeadlineSeconds"] = max(1, deadline)
    meta = _meta(job, names.batch_job(attempt), **labels)
    meta["annotations"] = {DEADLINE_ANNOTATION: str(policy.active_deadline_seconds or "")}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def children(
    job: FineTuneJob, attempt: int = 0, settings: OperatorConfig | None = None
) -> list[Manifest]:
    """Everything a job needs, in the order to create it."""
    return [
        config_map(job),
        headless_service(job),
        service_account(job),
        role(job),
        role_binding(job),
        batch_job(job, attempt, settings),
    ]
