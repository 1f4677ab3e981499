"""The pod entrypoint: two `finetune train` processes rendezvous like two pods of an
Indexed Job (node rank from JOB_COMPLETION_INDEX, master address from the environment)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune.trainer.launcher.run import free_port
from tests.trainer.jobs import FINETUNE, finetune_run, job_file, train_log
from tests.trainer.s3faults import Moto, moto  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


def two_nodes(
    job: Path, caches: Path, processes: list[subprocess.Popen[str]]
) -> list[tuple[str, str]]:
    """`finetune train JOB` as two pods of one gang, each with a cache (a machine) of
    its own; both must succeed. Their (stdout, stderr)."""
    port = free_port()
    nodes = []
    for index in (0, 1):
        env = {
            **os.environ,
            "FINETUNE_CACHE_DIR": str(caches / f"cache-{index}"),
            "FINETUNE_NNODES": "2",
            "FINETUNE_NPROC_PER_NODE": "1",
            "JOB_COMPLETION_INDEX": str(index),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [str(FINETUNE), "train", str(job)]
        nodes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
        processes.append(nodes[-1])
    results = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], (
        results[0][1][-2000:] + results[1][1][-2000:]
    )
    return results


def test_two_nodes_train_one_job(
    tmp_path: Path, tiny_model: Path, disc_images: Path, processes: list[subprocess.Popen[str]]
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 4},
        checkpointing={"everyNSteps": 2},
    )
    two_nodes(job, tmp_path, processes)

    out = tmp_path / "out"
    assert any(k.startswith("unet.") for k in load_file(out / "pytorch_lora_weights.safetensors"))
    assert [entry["step"] for entry in train_log(out)] == [
        1,
        2,
        3,
        4,
    ]  # written by global rank 0 only
    checkpoint = out / "checkpoints" / "step-00000004"
    assert (checkpoint / "rng-rank0000.pt").exists()
    assert (checkpoint / "rng-rank0001.pt").exists()


def test_the_class_images_one_node_generates_reach_the_other(
    tmp_path: Path,
    tiny_model: Path,
    disc_images: Path,
    processes: list[subprocess.Popen[str]],
    moto: Moto,  # noqa: F811
) -> None:
    """Rank 0 alone generates the class images prior preservation needs, on its node;
    with an S3 output they go up as they are made, and the other node fetches them (its
    ranks train on class images too)."""
    moto.store("runs")
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        data={
            "concepts": [
                {
                    "instanceImages": str(disc_images),
                    "instancePrompt": "a photo of sks disc",
                    "classPrompt": "a photo of a disc",
                    "classImages": {"count": 2},
                }
            ]
        },
        training={"maxSteps": 1, "priorPreservation": True},
        checkpointing={"everyNSteps": 1},
        output={"uri": "s3://runs/gang", "s3EndpointUrl": moto.url},
    )
    two_nodes(job, tmp_path, processes)
    fetched = sorted((tmp_path / "cache-1").rglob("class_images/concept-0/*.png"))
    assert len(fetched) == 2, "the other node has not the class images"


def test_shared_training_options_run_together(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        method="dreambooth",
        training={
            "maxSteps": 4,
            "gradientAccumulationSteps": 2,
            "snrGamma": 5.0,
            "noiseOffset": 0.1,
            "gradientCheckpointing": True,
            "ema": {"enabled": True, "decay": 0.9},
            "lrScheduler": "linear",
            "lrWarmupSteps": 2,
        },
        checkpointing={"everyNSteps": 2},
    )
    finetune_run(job)
    rates = [entry["lr"] for entry in train_log(tmp_path / "out")]
    assert rates[0] < rates[1]  # warming up
    assert rates[-1] < rates[1]  # then decaying linearly
    assert (tmp_path / "out" / "checkpoints" / "step-00000004" / "ema.pt").exists()
    StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None)


def test_8bit_adam_without_bitsandbytes_is_refused_before_training(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bitsandbytes is installed here")
    job = job_file(tmp_path, tiny_model, disc_images, training={"optimizer": "adamw8bit"})
    result = finetune_run(job, expect=2)
    assert "spec.training.optimizer: adamw8bit needs bitsandbytes" in result.stderr
