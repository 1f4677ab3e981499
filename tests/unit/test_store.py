"""The storage interface, the background uploader and durable checkpoints, against
moto's S3 server over HTTP on loopback (and a local folder)."""

from __future__ import annotations

import json
import threading
import time
from functools import partial
from pathlib import Path

import boto3
import pytest
import torch

from finetune.trainer.checkpoints import manifest
from finetune.trainer.checkpoints.durable import DurableCheckpoints
from finetune.trainer.errors import AccessDenied, DiskFull
from finetune.trainer.process.distributed import Rank
from finetune.trainer.storage.s3 import S3Settings, download_prefix
from finetune.trainer.storage.store import LocalStore, S3Store, Store, open_store
from finetune.trainer.storage.uploader import Task, Uploader
from tests.trainer.s3faults import Moto, moto  # noqa: F401 - the fixture

BUCKET = "runs"


def s3(moto: Moto) -> S3Store:  # noqa: F811
    boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=BUCKET)
    store = open_store(f"s3://{BUCKET}/job", S3Settings(moto.url))
    assert isinstance(store, S3Store)
    return store


def roundtrip(store: Store, tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights" * 1000)
    store.put_file(source, "a/b.bin")
    store.write_text("a/note.txt", "hello")
    assert dict(store.keys("a/")) == {"a/b.bin": 7000, "a/note.txt": 5}
    assert store.read_text("a/note.txt") == "hello"
    assert store.read_text("a/missing.txt") is None
    store.get_file("a/b.bin", tmp_path / "copy" / "b.bin")
    assert (tmp_path / "copy" / "b.bin").read_bytes() == source.read_bytes()
    store.delete(["a/b.bin"])
    assert dict(store.keys()) == {"a/note.txt": 5}


@pytest.mark.slow  # starts moto's S3 server
def test_s3_and_local_stores_behave_alike(moto: Moto, tmp_path: Path) -> None:  # noqa: F811
    roundtrip(s3(moto), tmp_path / "s3")
    roundtrip(LocalStore(tmp_path / "folder"), tmp_path / "local")


@pytest.mark.slow  # starts moto's S3 server
def test_wrong_credentials_fail_at_once_without_retrying(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moto import settings

    store = s3(moto)
    # From now on moto checks signatures against its IAM users: the key is unknown.
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    started = time.monotonic()
    with pytest.raises(AccessDenied, match=r"s3://runs/job/f: S3 refused the request \(\w+\)"):
        store.put_file(path, "f")
    with pytest.raises(AccessDenied):
        store.read_text("f")
    assert time.monotonic() - started < 5


@pytest.mark.slow  # starts moto's S3 server
def test_an_outage_is_ridden_out(moto: Moto, tmp_path: Path) -> None:  # noqa: F811
    store = s3(moto)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    moto.stop()
    restart = threading.Timer(3.0, moto.start)
    restart.start()
    started = time.monotonic()
    store.put_file(path, "f")  # retried until the server is back
    assert time.monotonic() - started >= 3.0
    assert dict(store.keys()) == {"f": 1000}


def test_uploader_keeps_order_and_hands_over_a_refusal(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    uploader = Uploader(store)
    done: list[int] = []
    for step in (1, 2, 3):
        path = tmp_path / f"{step}.bin"
        path.write_bytes(bytes(step))
        uploader.submit(Task(step, [(path, f"{step}.bin")], then=partial(done.append, step)))
    uploader.wait()
    assert done == [1, 2, 3]
    assert uploader.uploaded_through() == 3
    uploader.submit(Task(4, [(tmp_path / "missing.bin", "missing.bin")]))
    with pytest.raises(FileNotFoundError):
        uploader.wait()
    with pytest.raises(FileNotFoundError):
        uploader.submit(Task(5))
    assert uploader.uploaded_through() == 3
    uploader.close()


def save(root: Path, step: int, payload: bytes) -> None:
    folder = root / manifest.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(payload)
    (folder / "rng-rank0000.pt").write_bytes(b"rng")


@pytest.mark.slow  # starts moto's S3 server
def test_checkpoints_become_durable_in_order_and_are_retained(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = s3(moto)
    reported: list[tuple[str, int]] = []
    root = tmp_path / "checkpoints"
    durable = DurableCheckpoints(
        store,
        root,
        Rank(0, 0, 1),
        torch.device("cpu"),
        keep_last=2,
        report=lambda uri, step: reported.append((uri, step)),
    )
    for step in (2, 4, 6):
        save(root, step, bytes([step]) * 100)
        durable.saved(step, {"ranks": 1})
        durable.poll()
    durable.finish()
    assert [s for _, s in reported] == [2, 4, 6]
    assert reported[-1][0] == "s3://runs/job/checkpoints/step-00000006"
    tags = {key.split("/")[1] for key, _ in store.keys("checkpoints/")}
    assert tags == {"step-00000004", "step-00000006"}, "keep-last-2 applied in S3"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]
    document = json.loads(store.read_text("checkpoints/step-00000006/manifest.json") or "")
    assert [e["path"] for e in document["files"]] == ["model.pt", "rng-rank0000.pt"]

    # A fresh machine: the newest durable checkpoint comes back from S3.
    fresh = DurableCheckpoints(store, tmp_path / "fresh", Rank(0, 0, 1), torch.device("cpu"), 2)
    found = fresh.restore()
    assert found is not None
    assert found.step == 6
    assert (found.folder / "model.pt").read_bytes() == bytes([6]) * 100
    assert manifest.verify(found.folder) == 6


@pytest.mark.slow  # starts moto's S3 server
def test_a_corrupt_object_falls_back_to_the_previous_checkpoint(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = s3(moto)
    root = tmp_path / "checkpoints"
    durable = DurableCheckpoints(store, root, Rank(0, 0, 1), torch.device("cpu"), keep_last=3)
    for step in (2, 4):
        save(root, step, bytes([step]) * 100)
        durable.saved(step, {})
    durable.finish()
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"\xff" * 100)  # same size, other bytes
    store.put_file(damaged, "checkpoints/step-00000004/model.pt")
    fresh = DurableCheckpoints(store, tmp_path / "fresh", Rank(0, 0, 1), torch.device("cpu"), 3)
    found = fresh.restore()
    assert found is not None
    assert found.step == 2
    assert "s3://runs/job/checkpoints/step-00000004/model.pt does not match" in caplog.text


@pytest.mark.slow  # starts moto's S3 server
def test_a_checkpoint_without_manifest_is_never_used(moto: Moto, tmp_path: Path) -> None:  # noqa: F811
    store = s3(moto)
    root = tmp_path / "checkpoints"
    durable = DurableCheckpoints(store, root, Rank(0, 0, 1), torch.device("cpu"), keep_last=3)
    save(root, 2, b"two")
    durable.saved(2, {})
    durable.finish()
    save(root, 4, b"four")  # as if killed mid-upload: files, no manifest
    store.put_file(root / "step-00000004" / "model.pt", "checkpoints/step-00000004/model.pt")
    found = DurableCheckpoints(store, tmp_path / "x", Rank(0, 0, 1), torch.device("cpu"), 3)
    assert (restored := found.restore()) is not None
    assert restored.step == 2


def test_disk_full_while_saving_is_named(tmp_path: Path) -> None:
    import errno

    folder = tmp_path / "step-00000004"
    with (
        pytest.raises(DiskFull, match=r"step 4.*previous checkpoint is intact"),
        manifest.space_checked(folder, 4),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow  # starts moto's S3 server
def test_inputs_are_downloaded_once_and_checked(moto: Moto, tmp_path: Path) -> None:  # noqa: F811
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="data")
    for name in ("a.png", "b.png"):
        client.put_object(Bucket="data", Key=f"discs/{name}", Body=name.encode() * 50)
    settings = S3Settings(moto.url)
    cache = tmp_path / "cache" / "discs"
    download_prefix("s3://data/discs", cache, settings)
    first = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert sorted(first) == ["a.png", "b.png"]
    download_prefix("s3://data/discs", cache, settings)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == first, "downloaded again"

    # A damaged cached file (same size) is noticed once the marker is gone, and replaced.
    (cache / "a.png").write_bytes(b"x" * len(b"a.png" * 50))
    cache.with_name("discs.verified.json").unlink()
    download_prefix("s3://data/discs", cache, settings)
    assert (cache / "a.png").read_bytes() == b"a.png" * 50
