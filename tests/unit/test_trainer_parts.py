"""The trainer's pure parts: data order, checkpoint manifests, rendezvous, DeepSpeed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.api import FineTuneJob
from finetune.trainer.checkpoints import manifest
from finetune.trainer.data.concepts import IndexStream
from finetune.trainer.engine.trainer import deepspeed_config
from finetune.trainer.launcher.run import Rendezvous
from tests.support import lora_job


def test_ranks_read_disjoint_examples_and_cover_each_epoch() -> None:
    stream = IndexStream(size=8, seed=3)
    world, batch = 2, 2
    seen = []
    for micro in range(2):  # 2 micro-steps x 2 ranks x 2 images = one epoch of 8
        for rank in range(world):
            seen += [stream.example_at(p) for p in stream.positions(micro, rank, world, batch)]
    assert sorted(seen) == list(range(8))


def test_data_order_is_a_pure_function_of_seed_and_position() -> None:
    first = [IndexStream(5, seed=1).example_at(p) for p in range(20)]
    again = IndexStream(5, seed=1)
    assert [again.example_at(p) for p in reversed(range(20))][::-1] == first
    assert first != [IndexStream(5, seed=2).example_at(p) for p in range(20)]


def make_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / manifest.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights" * step)
    if complete:
        manifest.write_manifest(folder, step)
    return folder


def test_resume_picks_the_newest_checkpoint_whose_manifest_verifies(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)  # interrupted mid-save: no manifest
    found = manifest.latest(tmp_path)
    assert found is not None
    assert found.step == 20

    (tmp_path / "step-00000020" / "model.pt").write_bytes(b"bit rot")
    found = manifest.latest(tmp_path)
    assert found is not None
    assert found.step == 10


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert manifest.latest(tmp_path / "missing") is None
    make_checkpoint(tmp_path, 5, complete=False)
    assert manifest.latest(tmp_path) is None


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 5, complete=False)  # being written right now: kept
    manifest.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000003",
        "step-00000004",
        "step-00000005",
    ]


def test_rendezvous_in_a_pod_comes_from_the_indexed_job() -> None:
    env = {
        "FINETUNE_NNODES": "4",
        "JOB_COMPLETION_INDEX": "2",
        "FINETUNE_NPROC_PER_NODE": "8",
        "MASTER_ADDR": "job-0.job-workers",
        "MASTER_PORT": "29500",
    }
    rendezvous = Rendezvous.from_env(env)
    assert (rendezvous.nnodes, rendezvous.node_rank, rendezvous.world) == (4, 2, 32)
    assert rendezvous.master_addr == "job-0.job-workers"


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"),
    [("bf16", True, False), ("fp16", False, True), ("no", False, False)],
)
def test_deepspeed_config_follows_the_job(precision: str, bf16: bool, fp16: bool) -> None:
    spec = FineTuneJob.model_validate(
        lora_job(
            training={
                "batchSize": 3,
                "gradientAccumulationSteps": 2,
                "mixedPrecision": precision,
                "maxGradNorm": 0.5,
            },
            deepspeed={
                "zeroStage": 1,
                "offloadOptimizer": True,
                "config": {"zero_optimization": {"overlap_comm": True}},
            },
        )
    ).spec.training_spec()
    config = deepspeed_config(spec, world=4)
    assert config["train_batch_size"] == 3 * 2 * 4
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_clipping"] == 0.5
    assert (config["bf16"]["enabled"], config["fp16"]["enabled"]) == (bf16, fp16)
    zero = config["zero_optimization"]
    assert zero["stage"] == 1
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["overlap_comm"] is True  # the raw override is merged, not replacing


def test_caption_files_replace_the_concept_prompt(tmp_path: Path) -> None:
    from finetune.assets import write_images
    from finetune.trainer.data.concepts import examples_from

    folder = write_images(tmp_path / "images", 3)
    (folder / "image-001.txt").write_text("a photo of sks disc on grass\n")
    examples = examples_from(folder, "a photo of sks disc", caption_files=True, field="f")
    assert [e.prompt for e in examples] == [
        "a photo of sks disc",
        "a photo of sks disc on grass",
        "a photo of sks disc",
    ]
    plain = examples_from(folder, "a photo of sks disc", caption_files=False, field="f")
    assert {e.prompt for e in plain} == {"a photo of sks disc"}
