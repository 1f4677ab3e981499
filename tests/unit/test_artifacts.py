"""The result files `status.artifacts` lists: kinds, checksums, URIs, order and cap."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from finetune.api.status import Artifact
from finetune.trainer.outputs.artifacts import list_artifacts


def write(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def lora_run(work: Path) -> None:
    write(work / "pytorch_lora_weights.safetensors", b"lora weights")
    write(work / "pytorch_lora_weights_kohya.safetensors", b"kohya weights")
    write(work / "README.md", b"# card")
    write(work / "samples" / "step-00000002" / "grid.png")
    write(work / "samples" / "step-00000004" / "grid.png")
    write(work / "samples" / "step-00000004" / "prompt-00-00.png")
    # Working state and logs: not results.
    write(work / "train_log.jsonl")
    write(work / "checkpoints" / "step-00000004" / "manifest.json")
    write(work / ".run" / "plan-node0.json")
    write(work / "class_images" / "concept-0" / "0000.png")


@pytest.mark.parametrize(
    ("output_uri", "base"),
    [
        ("s3://models/runs/disc-lora/", "s3://models/runs/disc-lora"),
        ("s3://models", "s3://models"),
        ("/data/out", "/data/out"),
    ],
)
def test_lora_results_with_their_uris_and_kinds(tmp_path: Path, output_uri: str, base: str) -> None:
    lora_run(tmp_path)
    listed = list_artifacts(tmp_path, output_uri)
    assert [(a["uri"], a["kind"]) for a in listed] == [
        (f"{base}/pytorch_lora_weights.safetensors", "lora"),
        (f"{base}/pytorch_lora_weights_kohya.safetensors", "kohyaLora"),
        (f"{base}/README.md", "modelCard"),
        # The newest samples first: the cap cuts old ones.
        (f"{base}/samples/step-00000004/grid.png", "samples"),
        (f"{base}/samples/step-00000004/prompt-00-00.png", "samples"),
        (f"{base}/samples/step-00000002/grid.png", "samples"),
    ]
    weights = listed[0]
    assert weights["sha256"] == hashlib.sha256(b"lora weights").hexdigest()
    assert weights["bytes"] == len(b"lora weights")
    for artifact in listed:
        Artifact.model_validate(artifact)


def test_custom_diffusion_results(tmp_path: Path) -> None:
    write(tmp_path / "pytorch_custom_diffusion_weights.safetensors")
    write(tmp_path / "<new1>.safetensors")
    write(tmp_path / "README.md")
    kinds = {a["uri"].rsplit("/", 1)[1]: a["kind"] for a in list_artifacts(tmp_path, "/out")}
    assert kinds == {
        "pytorch_custom_diffusion_weights.safetensors": "customDiffusion",
        "<new1>.safetensors": "embedding",
        "README.md": "modelCard",
    }


def test_pipeline_results_are_the_folders_its_index_names(tmp_path: Path) -> None:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "LCMScheduler"],
        "safety_checker": [None, None],
    }
    write(tmp_path / "model_index.json", json.dumps(index).encode())
    write(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    write(tmp_path / "unet" / "config.json")
    write(tmp_path / "text_encoder" / "model.safetensors")
    write(tmp_path / "scheduler" / "scheduler_config.json")
    write(tmp_path / "safety_checker" / "stray.bin")  # not a component of this pipeline
    write(tmp_path / "README.md")
    listed = {a["uri"]: a["kind"] for a in list_artifacts(tmp_path, "s3://b/p")}
    assert listed == {
        "s3://b/p/model_index.json": "pipeline",
        "s3://b/p/scheduler/scheduler_config.json": "pipeline",
        "s3://b/p/text_encoder/model.safetensors": "pipeline",
        "s3://b/p/unet/config.json": "pipeline",
        "s3://b/p/unet/diffusion_pytorch_model.safetensors": "pipeline",
        "s3://b/p/README.md": "modelCard",
    }


def test_at_most_256_weights_and_card_kept(tmp_path: Path) -> None:
    write(tmp_path / "pytorch_lora_weights.safetensors")
    write(tmp_path / "README.md")
    for step in range(1, 301):
        write(tmp_path / "samples" / f"step-{step:08d}" / "grid.png")
    listed = list_artifacts(tmp_path, "/out")
    assert len(listed) == 256
    assert [a["kind"] for a in listed[:2]] == ["lora", "modelCard"]
    assert listed[2]["uri"] == "/out/samples/step-00000300/grid.png"


def test_the_card_lists_every_file_and_the_chosen_steps_samples_come_first(
    tmp_path: Path,
) -> None:
    """Beyond the status's cap the card still lists everything; the samples of the chosen
    weights' step and the last step come before the others, so the cap never cuts them."""
    write(tmp_path / "pytorch_lora_weights.safetensors")
    for step in range(1, 301):
        write(tmp_path / "samples" / f"step-{step:08d}" / "grid.png")
    every = list_artifacts(tmp_path, "/out", None, first_steps=[3, 300])
    assert len(every) == 301
    assert [a["uri"] for a in every[1:4]] == [
        "/out/samples/step-00000003/grid.png",
        "/out/samples/step-00000300/grid.png",
        "/out/samples/step-00000299/grid.png",
    ]
    capped = list_artifacts(tmp_path, "/out", first_steps=[3, 300])
    assert len(capped) == 256
    assert capped[1]["uri"] == "/out/samples/step-00000003/grid.png"
