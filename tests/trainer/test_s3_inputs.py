"""Base model, data and output on S3, spoken to over HTTP (moto's S3 server on loopback)."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from safetensors.torch import load_file

from tests.trainer import jobs
from tests.trainer.jobs import finetune_run, job_file

pytestmark = pytest.mark.slow

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def upload(client: object, folder: Path, bucket: str, prefix: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")  # type: ignore[attr-defined]


def test_train_from_s3_to_s3(
    tmp_path: Path, s3_endpoint: str, tiny_model: Path, disc_images: Path
) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="models")
    client.create_bucket(Bucket="data")
    upload(client, tiny_model, "models", "tiny-sd")
    upload(client, disc_images, "data", "discs")

    job = job_file(
        tmp_path,
        Path("unused"),
        Path("unused"),
        baseModel={"uri": "s3://models/tiny-sd"},
        data={
            "concepts": [
                {"instanceImages": "s3://data/discs/", "instancePrompt": "a photo of sks disc"}
            ]
        },
        training={"maxSteps": 2},
        checkpointing={"everyNSteps": 2},
        output={"uri": "s3://models/runs/disc-lora", "s3EndpointUrl": s3_endpoint},
    )
    finetune_run(job, nproc=1, env=CREDENTIALS)

    keys = {
        o["Key"]
        for o in client.list_objects_v2(Bucket="models", Prefix="runs/disc-lora/")["Contents"]
    }
    assert "runs/disc-lora/pytorch_lora_weights.safetensors" in keys
    assert "runs/disc-lora/README.md" in keys
    # TensorBoard's event file, with the results (`tensorboard --logdir s3://...` reads it).
    assert any(k.startswith("runs/disc-lora/logs/events.out.tfevents.") for k in keys)
    assert not any("/.run/" in key or "/.staging/" in key for key in keys), (
        "working files were uploaded"
    )
    # The checkpoint went up in the background, its manifest with it.
    assert "runs/disc-lora/checkpoints/step-00000002/manifest.json" in keys
    weights = tmp_path / "weights.safetensors"
    client.download_file("models", "runs/disc-lora/pytorch_lora_weights.safetensors", str(weights))
    assert any(k.startswith("unet.") for k in load_file(weights))


def test_missing_s3_prefix_names_the_uri(
    tmp_path: Path, s3_endpoint: str, tiny_model: Path
) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data")
    job = job_file(
        tmp_path,
        tiny_model,
        Path("unused"),
        data={
            "concepts": [{"instanceImages": "s3://data/nothing-here/", "instancePrompt": "a photo"}]
        },
        output={"s3EndpointUrl": s3_endpoint},
    )
    result = finetune_run(job, nproc=1, env=CREDENTIALS, expect=2)
    assert "s3://data/nothing-here/: no objects under this S3 prefix" in result.stderr


def test_a_bad_image_at_an_s3_prefix_is_named_by_its_key(
    tmp_path: Path, s3_endpoint: str, tiny_model: Path, disc_images: Path
) -> None:
    """The images are checked in the cache's copy; the refusal names the S3 object."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="data")
    upload(client, disc_images, "data", "discs")
    client.put_object(Bucket="data", Key="discs/broken.png", Body=b"\x89PNG\r\n\x1a\n half")
    job = job_file(
        tmp_path,
        tiny_model,
        Path("unused"),
        data={"concepts": [{"instanceImages": "s3://data/discs", "instancePrompt": "a photo"}]},
        output={"s3EndpointUrl": s3_endpoint},
    )
    result = finetune_run(job, nproc=1, env=CREDENTIALS, expect=2)
    assert (
        "spec.data.concepts[0].instanceImages: s3://data/discs/broken.png: not a readable image"
        in result.stderr
    )
    assert "s3-data" not in result.stderr  # the cache's folder


def prior_preservation_job(
    folder: Path, model: Path, images: Path, output: str, endpoint: str, classes: str | None
) -> Path:
    """A DreamBooth job with prior preservation (2 class images) into the S3 `output`,
    its class images kept at `classes` (in the output without one). Its cache, beside
    the job file in `folder`, is a machine of its own."""
    folder.mkdir()
    return jobs.prior_preservation_job(
        folder,
        model,
        images,
        classes,
        training={"maxSteps": 1},
        checkpointing={"everyNSteps": 1},
        output={"uri": output, "s3EndpointUrl": endpoint},
    )


def stored(client: Any, bucket: str, prefix: str) -> dict[str, str]:
    """Key -> ETag of every object under `prefix`."""
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"]: item["ETag"] for item in listing}


def test_class_images_generated_into_an_s3_prefix_are_kept_there_for_the_next_job(
    tmp_path: Path, s3_endpoint: str, tiny_model: Path, disc_images: Path
) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="runs")
    classes = "s3://runs/class-images/disc"  # empty: the first job generates them

    def run(name: str) -> str:
        job = prior_preservation_job(
            tmp_path / name, tiny_model, disc_images, f"s3://runs/{name}", s3_endpoint, classes
        )
        result = finetune_run(job, nproc=1, env=CREDENTIALS)
        return result.stdout + result.stderr

    first = run("first")
    assert "generating 2 class images" in first
    kept = stored(client, "runs", "class-images/disc/")
    assert len(kept) == 2
    assert all(key.endswith(".png") for key in kept)

    second = run("second")  # another machine: its cache is empty
    assert f"Class images {classes}: 2 fetched" in second
    assert "generating" not in second, "the kept class images were generated again"
    assert stored(client, "runs", "class-images/disc/") == kept

    # One made but never sent (its run killed in between): the next start sends it.
    lost = sorted(kept)[0]
    client.delete_object(Bucket="runs", Key=lost)
    finetune_run(tmp_path / "second" / "tiny.yaml", nproc=1, env=CREDENTIALS)
    assert stored(client, "runs", "class-images/disc/") == kept


def test_class_images_kept_in_an_s3_output_come_back_to_a_fresh_machine(
    tmp_path: Path, s3_endpoint: str, tiny_model: Path, disc_images: Path
) -> None:
    """Without `classImages.uri` the output keeps them, sent as they are generated: a
    job resumed on another machine trains with the same images, not new ones."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="runs")
    output = "s3://runs/disc"
    job = prior_preservation_job(
        tmp_path / "first", tiny_model, disc_images, output, s3_endpoint, None
    )
    finetune_run(job, nproc=1, env=CREDENTIALS)
    kept = stored(client, "runs", "disc/class_images/concept-0/")
    assert len(kept) == 2

    # The same job on a fresh machine: its cache is empty.
    moved = tmp_path / "second"
    moved.mkdir()
    again = finetune_run(Path(shutil.copy(job, moved / job.name)), nproc=1, env=CREDENTIALS)
    assert f"Class images {output}/class_images/concept-0: 2 fetched" in again.stdout
    assert "generating" not in again.stderr
    assert stored(client, "runs", "disc/class_images/concept-0/") == kept
