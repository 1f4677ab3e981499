"""Base model, data and output on S3, spoken to over HTTP (moto's S3 server on loopback)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from safetensors.torch import load_file

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
