"""A FineTuneJob from `kubectl apply` to trained weights: the real operator, the
emulated API, and the pods' commands run here as processes by a stand-in kubelet.

A 2-node LoRA job (one CPU process per pod, gloo): the operator creates the
gang, the trainer in each "pod" reads the job file from the ConfigMap, rank 0
reports progress to the FineTuneJob's status through the API, and the job ends
Succeeded with its artifacts listed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.emulator import EmulatedCluster
from tests.operator.conftest import Kube, OperatorProcess
from tests.operator.kubelet import Kubelet
from tests.support import lora_job

pytestmark = pytest.mark.slow

NAME = "disc-lora"


def test_a_two_node_lora_job_runs_to_success(
    kube: Kube,
    cluster: EmulatedCluster,
    operator: OperatorProcess,
    namespace: str,
    tiny_model: Path,
    disc_images: Path,
    tmp_path: Path,
) -> None:
    output = tmp_path / "out"
    document = lora_job(
        baseModel={"uri": str(tiny_model)},
        data={
            "concepts": [
                {"instanceImages": str(disc_images), "instancePrompt": "a photo of sks disc"}
            ],
            "resolution": 64,
        },
        training={"maxSteps": 4, "learningRate": 1e-3, "batchSize": 1},
        checkpointing={"everyNSteps": 2},
        output={"uri": str(output)},
        resources={"nodes": 2, "gpusPerNode": 0},
    )
    document["metadata"]["name"] = NAME
    kube.create_job(document, namespace)

    kubelet = Kubelet(kube, cluster.url, namespace, tmp_path / "pods")
    codes = kubelet.run(f"{NAME}-a0")
    assert codes == [0, 0], (
        kubelet.log(f"{NAME}-a0", 0)[-3000:] + kubelet.log(f"{NAME}-a0", 1)[-3000:]
    )

    status = kube.wait_phase(NAME, namespace, "Succeeded")
    progress = status["progress"]
    assert (progress["step"], progress["totalSteps"], progress["percent"]) == (4, 4, 100)
    assert progress["lastHeartbeat"]
    assert status["lastCheckpoint"]["step"] == 4
    assert status["startTime"] <= status["completionTime"]
    weights = output / "pytorch_lora_weights.safetensors"
    listed = {Path(a["uri"]).name: a for a in status["artifacts"]}
    assert listed["pytorch_lora_weights.safetensors"]["kind"] == "lora"
    assert (
        listed["pytorch_lora_weights.safetensors"]["sha256"]
        == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert listed["pytorch_lora_weights.safetensors"]["bytes"] == weights.stat().st_size
    assert load_file(weights)  # real weights, not an empty file
    reasons = {event.reason for event in kube.events(namespace, NAME)}
    assert {"Created", "Started", "CheckpointSaved", "Succeeded"} <= reasons
    # The gang was two ranks: each pod wrote its own RNG state into the checkpoint.
    checkpoint = Path(status["lastCheckpoint"]["uri"])
    assert sorted(p.name for p in checkpoint.glob("rng-rank*")) == [
        "rng-rank0000.pt",
        "rng-rank0001.pt",
    ]
