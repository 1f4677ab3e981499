"""The operator's builders: every child of a FineTuneJob, as Kubernetes will see it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from finetune.api import FineTuneJob
from finetune.api.loading import load_job
from finetune_operator import builders
from finetune_operator.config import OperatorConfig
from tests.support import EXAMPLES, lcm_job, lora_job

KUBERNETES_VERSION = "1.31.0"


def job(**spec: Any) -> FineTuneJob:
    document = lora_job(**spec)
    document["metadata"]["namespace"] = "ml"
    return FineTuneJob.model_validate(document)


def pod_of(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def env_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        e["name"]: e.get("value", e.get("valueFrom"))
        for e in pod_of(manifest)["containers"][0]["env"]
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_child_validates_against_the_kubernetes_schemas(example: Any) -> None:
    for child in builders.children(load_job(example), attempt=2):
        kubernetes_validate.validate(child, KUBERNETES_VERSION, strict=True)


def test_indexed_job_rendezvous_for_a_multi_node_gang() -> None:
    manifest = builders.batch_job(job(resources={"nodes": 4, "gpusPerNode": 8}), attempt=3)
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == "dog-lora-a3"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimit"] == 0  # the operator restarts the whole gang instead
    # A pod the cluster takes away fails the Job with the cause on the Job itself.
    assert spec["podFailurePolicy"] == {
        "rules": [
            {
                "action": "FailJob",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }
        ]
    }
    assert pod_of(manifest)["restartPolicy"] == "Never"  # which a pod failure policy needs
    # What its deadline was made from, so a changed limit can move it.
    assert manifest["metadata"]["annotations"] == {"finetune.dev/active-deadline-seconds": ""}
    pod = pod_of(manifest)
    assert pod["subdomain"] == "dog-lora-gang"
    env = env_of(manifest)
    assert env["FINETUNE_NNODES"] == "4"
    assert env["FINETUNE_NPROC_PER_NODE"] == "8"
    assert env["MASTER_ADDR"] == "dog-lora-a3-0.dog-lora-gang"  # pod 0 through the headless Service
    assert pod["containers"][0]["command"] == ["finetune", "train", "/etc/finetune/job.yaml"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_a_cpu_job_requests_no_gpu() -> None:
    """`gpusPerNode: 0` (kind, minikube): one training process per pod, and a pod a
    node without GPUs can schedule."""
    manifest = builders.batch_job(
        job(resources={"gpusPerNode": 0, "cpu": "2", "memory": "4Gi"}), attempt=0
    )
    resources = pod_of(manifest)["containers"][0]["resources"]
    assert resources["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert not any("gpu" in key for key in resources.get("requests", {}))
    assert env_of(manifest)["FINETUNE_NPROC_PER_NODE"] == "1"


def test_quantities_may_be_written_as_numbers() -> None:
    """`cpu: 8` is a Kubernetes quantity like `cpu: "8"`; the API server hands it over
    as a number."""
    manifest = builders.batch_job(job(resources={"cpu": 8, "memory": "64Gi"}), attempt=0)
    assert pod_of(manifest)["containers"][0]["resources"]["limits"]["cpu"] == "8"


def test_headless_service_selects_the_gang() -> None:
    service = builders.headless_service(job())
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["metadata"]["name"] == "dog-lora-gang"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_config_map_holds_a_job_file_the_trainer_accepts(tmp_path: Any, example: Path) -> None:
    original = load_job(example)
    data = builders.config_map(original)["data"]["job.yaml"]
    path = tmp_path / "job.yaml"
    path.write_text(data)
    mounted = load_job(path)
    assert mounted.spec.training_spec() == original.spec.training_spec()


def test_shared_memory_scratch_and_a_read_only_root() -> None:
    pod = pod_of(builders.batch_job(job(resources={"sharedMemory": "32Gi"}), attempt=0))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    container = pod["containers"][0]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {
        "/dev/shm",
        "/tmp",
        "/var/cache/finetune",
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_credentials_come_from_secrets_by_reference() -> None:
    manifest = builders.batch_job(
        job(
            baseModel={
                "uri": "hf://org/gated@v1",
                "hubTokenSecretRef": {"name": "hf", "key": "token"},
            },
            output={"credentialsSecretRef": {"name": "s3-creds"}},
        ),
        attempt=0,
    )
    container = pod_of(manifest)["containers"][0]
    assert env_of(manifest)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]


def test_the_base_model_and_the_teacher_each_get_their_own_hub_token() -> None:
    document = lcm_job(
        baseModel={"uri": "hf://org/base@v1", "hubTokenSecretRef": {"name": "base-hf"}},
        lcm={
            "teacherModel": {
                "uri": "hf://org/gated-teacher@v2",
                "hubTokenSecretRef": {"name": "teacher-hf", "key": "hf"},
            }
        },
    )
    document["metadata"]["namespace"] = "ml"
    manifest = builders.batch_job(FineTuneJob.model_validate(document), attempt=0)
    env = env_of(manifest)
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "base-hf", "key": "token"}}
    assert env["FINETUNE_TEACHER_HF_TOKEN"] == {"secretKeyRef": {"name": "teacher-hf", "key": "hf"}}
    names = [e["name"] for e in pod_of(manifest)["containers"][0]["env"]]
    assert len(names) == len(set(names))


def test_scheduling_fields_are_copied_into_the_pods() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
        }
    }
    pod = pod_of(
        builders.batch_job(
            job(
                resources={
                    "nodeSelector": {"gpu": "h100"},
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "affinity": affinity,
                    "imagePullSecrets": [{"name": "registry"}],
                    "image": "registry.example/trainer:1",
                },
                runPolicy={"priorityClassName": "research"},
            ),
            attempt=0,
        )
    )
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["affinity"] == affinity
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["priorityClassName"] == "research"
    assert pod["containers"][0]["image"] == "registry.example/trainer:1"


@pytest.mark.parametrize(
    ("run_policy", "suspended"),
    [({}, False), ({"suspend": True}, True), ({"queueName": "gpus"}, True)],
)
def test_suspend_and_kueue_admission(run_policy: dict[str, Any], suspended: bool) -> None:
    manifest = builders.batch_job(job(runPolicy=run_policy), attempt=0)
    assert manifest["spec"]["suspend"] is suspended
    assert manifest["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == run_policy.get(
        "queueName"
    )


def test_trainer_may_patch_only_its_own_status() -> None:
    rules = builders.role(job())["rules"]
    assert rules == [
        {
            "apiGroups": ["finetune.dev"],
            "resources": ["finetunejobs"],
            "resourceNames": ["dog-lora"],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["finetune.dev"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["dog-lora"],
            "verbs": ["get", "patch"],
        },
    ]
    binding = builders.role_binding(job())
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "dog-lora-trainer", "namespace": "ml"}
    ]
    assert pod_of(builders.batch_job(job(), attempt=0))["serviceAccountName"] == "dog-lora-trainer"


def test_trainer_defaults_from_the_operator_configuration() -> None:
    config = OperatorConfig.from_env(
        {
            "FINETUNE_TRAINER_IMAGE": "registry.local/trainer:1",
            "FINETUNE_TRAINER_PULL_SECRETS": "a,b",
            "FINETUNE_PUSHGATEWAY_URL": "http://gateway:9091",
        }
    )
    manifest = builders.batch_job(job(resources={"imagePullSecrets": [{"name": "b"}]}), 0, config)
    pod = pod_of(manifest)
    assert pod["containers"][0]["image"] == "registry.local/trainer:1"
    assert pod["imagePullSecrets"] == [{"name": "b"}, {"name": "a"}]
    assert env_of(manifest)["FINETUNE_PUSHGATEWAY_URL"] == "http://gateway:9091"
    assert "FINETUNE_PUSHGATEWAY_URL" not in env_of(builders.batch_job(job(), 0))


def test_a_hub_model_lets_the_offline_trainer_image_download() -> None:
    assert env_of(builders.batch_job(job(), 0))["HF_HUB_OFFLINE"] == "0"
    local = job(baseModel={"uri": "s3://models/sd15"})
    assert "HF_HUB_OFFLINE" not in env_of(builders.batch_job(local, 0))
    # Every model the job loads counts: a hub VAE, the evaluators' hub defaults.
    hub_vae = job(baseModel={"uri": "s3://models/sd15", "vaeUri": "hf://org/vae"})
    assert env_of(builders.batch_job(hub_vae, 0))["HF_HUB_OFFLINE"] == "0"
    scored = job(
        baseModel={"uri": "s3://models/sd15"},
        validation={"prompts": ["a photo of sks dog"], "metrics": ["clipText"]},
    )
    assert env_of(builders.batch_job(scored, 0))["HF_HUB_OFFLINE"] == "0"
    local_clip = job(
        baseModel={"uri": "s3://models/sd15"},
        validation={
            "prompts": ["a photo of sks dog"],
            "metrics": ["clipText"],
            "evaluator": {"clipModel": "s3://models/clip"},
        },
    )
    assert "HF_HUB_OFFLINE" not in env_of(builders.batch_job(local_clip, 0))
