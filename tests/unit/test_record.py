"""A run's record (train log, samples, TensorBoard event files) sent to an S3 output with
each checkpoint and brought back on resume, against moto's S3 server over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.trainer.checkpoints.record import RunRecord
from finetune.trainer.storage.s3 import S3Store
from tests.trainer.s3faults import Moto, moto  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow  # starts moto's S3 server


def log_text(*steps: int, loss: float = 0.5) -> str:
    return "".join(json.dumps({"step": s, "loss": loss}) + "\n" for s in steps)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def record(tmp_path: Path, store: S3Store, name: str = "run") -> RunRecord:
    work_dir = tmp_path / name
    (work_dir / "checkpoints").mkdir(parents=True)
    return RunRecord(work_dir, store, work_dir / "checkpoints")


def test_each_checkpoint_sends_what_is_new_and_the_train_log_as_of_its_step(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = moto.store()
    run = record(tmp_path, store)
    train_log = write(run.work_dir / "train_log.jsonl", log_text(1, 2))
    write(run.work_dir / "samples/step-00000002/grid.png", b"grid 2")
    first = run.files(2)
    assert [key for _, key in first] == ["samples/step-00000002/grid.png", "train_log.jsonl"]

    with train_log.open("a") as handle:
        handle.write(log_text(3, 4))
    write(run.work_dir / "samples/step-00000004/grid.png", b"grid 4")
    # An interrupted run's sample of a later step: not the record of step 4.
    write(run.work_dir / "samples/step-00000006/grid.png", b"grid 6")
    second = run.files(4)
    assert [key for _, key in second] == ["samples/step-00000004/grid.png", "train_log.jsonl"]
    # The train log goes up as it was at the checkpoint, whatever is appended meanwhile.
    with train_log.open("a") as handle:
        handle.write(log_text(5))
    sent_log = second[-1][0]
    assert sent_log.read_text() == log_text(1, 2, 3, 4)

    for path, key in first + second:
        store.put_file(path, key)
    # Sent and unchanged: the results' upload leaves them out; a sample made again is not.
    assert run.holds(
        run.work_dir / "samples/step-00000002/grid.png", "samples/step-00000002/grid.png"
    )
    write(run.work_dir / "samples/step-00000004/grid.png", b"grid 4, made again")
    assert not run.holds(
        run.work_dir / "samples/step-00000004/grid.png", "samples/step-00000004/grid.png"
    )
    assert [key for _, key in run.files(4)] == ["samples/step-00000004/grid.png", "train_log.jsonl"]


def test_a_fresh_machine_gets_the_record_up_to_the_resumed_step(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = moto.store()
    store.write_text("train_log.jsonl", log_text(1, 2, 3, 4, 5))
    for key in (
        "samples/step-00000002/grid.png",
        "samples/step-00000004/grid.png",
        "samples/step-00000006/grid.png",  # a run's that ended before its checkpoint
        "samples/teacher/prompt-00-00.png",  # an LCM teacher's, which every step has
        "logs/events.out.tfevents.1.host.1.0",
    ):
        store.write_text(key, key)
    run = record(tmp_path, store)
    run.restore(4)

    here = run.work_dir
    assert (here / "train_log.jsonl").read_text() == log_text(1, 2, 3, 4, 5)  # trimmed later
    found = sorted(p.relative_to(here).as_posix() for p in (here / "samples").rglob("*.png"))
    assert found == [
        "samples/step-00000002/grid.png",
        "samples/step-00000004/grid.png",
        "samples/teacher/prompt-00-00.png",
    ]
    assert (here / "samples/step-00000004/grid.png").read_text() == "samples/step-00000004/grid.png"
    assert not (here / "logs").exists(), "TensorBoard's files stay in the output"
    # Fetched, so not sent again: not with the next checkpoint, nor with the results.
    assert [key for _, key in run.files(4)] == ["train_log.jsonl"]
    assert run.holds(here / "samples/step-00000002/grid.png", "samples/step-00000002/grid.png")


def test_a_local_record_that_reaches_the_step_is_kept(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = moto.store()
    store.write_text("train_log.jsonl", log_text(1, 2, 3, 4, loss=0.9))
    store.write_text("samples/step-00000002/grid.png", "the store's")
    store.write_text("samples/step-00000004/grid.png", "the store's")
    run = record(tmp_path, store)
    write(run.work_dir / "train_log.jsonl", log_text(1, 2, 3, 4, 5))
    write(run.work_dir / "samples/step-00000002/grid.png", "local grid!")  # same size
    write(run.work_dir / "samples/step-00000004/grid.png", "local grid, another size")
    run.restore(4)

    here = run.work_dir
    assert (here / "train_log.jsonl").read_text() == log_text(1, 2, 3, 4, 5)
    # A sample of the same size is taken for the store's (not sent again with checkpoints,
    # but sent with the results); one that differs comes from the store, whose it is.
    assert (here / "samples/step-00000002/grid.png").read_text() == "local grid!"
    assert (here / "samples/step-00000004/grid.png").read_text() == "the store's"
    assert [key for _, key in run.files(4)] == ["train_log.jsonl"]
    assert not run.holds(here / "samples/step-00000002/grid.png", "samples/step-00000002/grid.png")
    assert run.holds(here / "samples/step-00000004/grid.png", "samples/step-00000004/grid.png")


def test_a_local_train_log_behind_the_step_is_replaced_by_the_outputs(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = moto.store()
    store.write_text("train_log.jsonl", log_text(1, 2, 3, 4, 5, 6))
    run = record(tmp_path, store)
    # This machine ran the job up to step 3; another took it on to step 6's checkpoint.
    write(run.work_dir / "train_log.jsonl", log_text(1, 2, 3, loss=0.1))
    run.restore(6)
    assert (run.work_dir / "train_log.jsonl").read_text() == log_text(1, 2, 3, 4, 5, 6)
