"""A run's end removes what an earlier run in its output left that it does not make
(another format's weights, a pipeline where it saves a LoRA, a renamed token's file), so
those are not listed, uploaded or taken for this run's; the user's samples, logs and
checkpoints stay."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from finetune.trainer.outputs import earlier
from finetune.trainer.outputs.artifacts import list_artifacts
from finetune.trainer.storage.s3 import S3Settings, S3Store
from tests.trainer.s3faults import Moto, moto  # noqa: F401 - the fixture

MADE = {"pytorch_lora_weights.safetensors", "README.md"}  # a LoRA run, diffusers only
# What stays of `earlier_output` after such a run: its results, and the run's own files.
KEPT = [
    "README.md",
    "checkpoints/step-00000002/manifest.json",
    "logs/events",
    "pytorch_lora_weights.safetensors",
    "samples/step-00000002/grid.png",
    "train_log.jsonl",
]
INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}


def earlier_output(folder: Path) -> dict[str, str]:
    """An output where earlier runs left a pipeline, a kohya LoRA and Custom Diffusion
    weights with a token file, beside a run's working folders and this run's LoRA."""
    files = {
        "model_index.json": json.dumps(INDEX),
        "unet/config.json": "{}",
        "pytorch_lora_weights.safetensors": "new",
        "pytorch_lora_weights_kohya.safetensors": "old",
        "pytorch_custom_diffusion_weights.safetensors": "old",
        "<old>.safetensors": "old",
        "README.md": "card",
        "samples/step-00000002/grid.png": "png",
        "checkpoints/step-00000002/manifest.json": "{}",
        "logs/events": "tb",
        "train_log.jsonl": "{}",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def test_a_run_removes_the_results_an_earlier_run_left_that_it_does_not_make(
    tmp_path: Path,
) -> None:
    earlier_output(tmp_path)
    earlier.remove_from_folder(tmp_path, MADE)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == KEPT
    assert [a["kind"] for a in list_artifacts(tmp_path, "out")] == ["lora", "modelCard", "samples"]


def test_a_safetensors_file_is_a_token_file_only_beside_custom_diffusion_weights() -> None:
    names = ["mine.safetensors", "pytorch_lora_weights.safetensors"]
    assert earlier.earlier_results(names, set(), {"README.md"}) == [
        "pytorch_lora_weights.safetensors"
    ]


@pytest.mark.slow  # starts moto's S3 server
def test_an_s3_output_loses_them_too_once_the_new_results_are_up(
    tmp_path: Path,
    moto: Moto,  # noqa: F811
) -> None:
    files = earlier_output(tmp_path)
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="runs")
    for name, text in files.items():
        client.put_object(Bucket="runs", Key=f"job/{name}", Body=text.encode())
    client.put_object(Bucket="runs", Key="job/unet_mine/a.bin", Body=b"not a part")
    store = S3Store("s3://runs/job", S3Settings(moto.url))
    stale = earlier.stale_in_store(store, MADE)
    assert stale == [
        "<old>.safetensors",
        "model_index.json",
        "pytorch_custom_diffusion_weights.safetensors",
        "pytorch_lora_weights_kohya.safetensors",
        "unet/config.json",
    ]
    earlier.remove_from_store(store, stale)
    listed = client.list_objects_v2(Bucket="runs", Prefix="job/")["Contents"]
    assert sorted(item["Key"][4:] for item in listed) == sorted([*KEPT, "unet_mine/a.bin"])
