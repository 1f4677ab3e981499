"""Durable checkpoints, against moto's S3 server over HTTP on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.trainer.checkpoints import manifest
from finetune.trainer.checkpoints.durable import DurableCheckpoints
from finetune.trainer.errors import DiskFull
from finetune.trainer.process.distributed import Rank
from finetune.trainer.storage.s3 import S3Store
from tests.trainer.s3faults import Moto, moto  # noqa: F401 - the fixture

BUCKET = "runs"


def s3(moto: Moto) -> S3Store:  # noqa: F811
    return moto.store(BUCKET)


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
