"""A run's checkpoints: manifests, retention, resume selection and the layout check,
with a local output and with an S3 one (moto's S3 server over HTTP on loopback)."""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.api.selection import KeepBest
from finetune.trainer.checkpoints import manifest
from finetune.trainer.checkpoints.layout import check_max_steps, check_run
from finetune.trainer.checkpoints.replica import durable_tags
from finetune.trainer.checkpoints.run_checkpoints import RunCheckpoints
from finetune.trainer.checkpoints.space import space_checked
from finetune.trainer.checkpoints.state import TrainingState
from finetune.trainer.errors import DiskFull, JobInputError
from finetune.trainer.process.distributed import Rank
from finetune.trainer.process.stopping import Stopped
from finetune.trainer.storage.local import LocalStore
from finetune.trainer.storage.store import Store
from tests.trainer.s3faults import Moto, moto  # noqa: F401 - the fixture


class FakeEngine:
    """DeepSpeed's engine as a checkpoint sees it: one file of weights per step."""

    def __init__(self) -> None:
        self.loaded: str | None = None

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict[str, Any], **_: Any
    ) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.pt").write_bytes(bytes([client_state["step"]]) * 100)

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> None:
        self.loaded = tag


class NoState:
    """Batches and a method with nothing of their own to keep."""

    def state(self) -> dict[str, Any]:
        return {}

    def checkpoint_state(self) -> None:
        return None


def start_run(
    root: Path,
    replica: Store | None = None,
    keep_last: int = 3,
    reported: list[tuple[str, int]] | None = None,
    layout: dict[str, Any] | None = None,
    engine: FakeEngine | None = None,
    keep_best: KeepBest | None = None,
    basis: str | None = None,
) -> tuple[RunCheckpoints, FakeEngine, int]:
    """A run's checkpoints as a run starts them: the newest found and resumed from; the
    step it goes on from."""
    engine = engine or FakeEngine()
    state = TrainingState(engine, NoState(), NoState(), None)  # type: ignore[arg-type]
    checkpoints = RunCheckpoints(
        root,
        Rank(0, 0, 1),
        torch.device("cpu"),
        keep_last,
        replica,
        (lambda where, step: reported.append((where, step))) if reported is not None else None,
        keep_best,
        basis=basis,
    )
    step = checkpoints.resume(checkpoints.newest(), state, layout or {"ranks": 1})
    return checkpoints, engine, step


def make_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / manifest.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights" * step)
    if complete:
        entries = manifest.describe(folder, manifest.files_in(folder))
        manifest.write_manifest(folder, step, {}, entries)
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
    _, engine, step = start_run(tmp_path)
    assert step == 0
    assert engine.loaded is None


def test_a_local_output_keeps_the_newest_complete_checkpoints_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    reported: list[tuple[str, int]] = []
    checkpoints, _, _ = start_run(root, keep_last=2, reported=reported)
    for step in (1, 2):
        checkpoints.save(step)
    make_checkpoint(root, 5, complete=False)  # being written right now: kept
    for step in (3, 4):
        checkpoints.save(step)
    assert sorted(p.name for p in root.iterdir()) == [
        "step-00000003",
        "step-00000004",
        "step-00000005",
    ]
    assert reported == [(str(root / manifest.tag_for(s)), s) for s in (1, 2, 3, 4)]
    document = json.loads((root / "step-00000004" / "manifest.json").read_text())
    assert document["layout"] == {"ranks": 1}
    assert [e["path"] for e in document["files"]] == ["model.pt", "rng-rank0000.pt"]

    _, engine, step = start_run(root)
    assert step == 4
    assert engine.loaded == "step-00000004"


def test_when_every_checkpoint_is_corrupt_resume_refuses_naming_each(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 8, complete=False)  # a save cut short: no checkpoint at all
    (tmp_path / "step-00000002" / "model.pt").write_bytes(b"bit rot")
    (tmp_path / "step-00000004" / "manifest.json").write_text('{"step": 4, "fil')
    (tmp_path / "step-00000006" / "model.pt").unlink()
    engine = FakeEngine()
    with pytest.raises(JobInputError) as refusal:
        start_run(tmp_path, engine=engine)
    assert str(refusal.value) == (
        f"{tmp_path}: none of the run's checkpoints can be resumed from ("
        "step-00000002: model.pt does not match its manifest (size or SHA-256); "
        "step-00000004: manifest.json is not a readable manifest; "
        "step-00000006: model.pt is missing); "
        f"restore them, or remove {tmp_path} to start the run over from step 0"
    )
    assert engine.loaded is None


def test_retention_does_not_count_corrupt_checkpoints_as_kept(tmp_path: Path) -> None:
    first, _, _ = start_run(tmp_path, keep_last=3)
    for step in (2, 4, 6):
        first.save(step)
    (tmp_path / "step-00000006" / "model.pt").write_bytes(b"bit rot")
    checkpoints, _, step = start_run(tmp_path, keep_last=2)
    assert step == 4
    checkpoints.save(5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000004",
        "step-00000005",
        "step-00000006",
    ], "the newest two that verify are kept; the corrupt one is not one of them"
    checkpoints.save(6)  # written again: it counts now
    checkpoints.save(7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006", "step-00000007"]


def test_retention_in_the_store_does_not_count_corrupt_checkpoints(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    first, _, _ = start_run(tmp_path / "first", store, keep_last=3)
    for step in (2, 4, 6):
        first.save(step)
    first.finish()
    (tmp_path / "store" / "checkpoints" / "step-00000006" / "model.pt").write_bytes(b"bit rot")
    checkpoints, _, step = start_run(tmp_path / "fresh", store, keep_last=2)
    assert step == 4
    checkpoints.save(5)
    checkpoints.finish()
    assert durable_tags([key for key, _ in store.keys("")]) == [
        "step-00000004",
        "step-00000005",
        "step-00000006",
    ]


def test_when_every_checkpoint_in_the_store_is_corrupt_resume_refuses(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    checkpoints, _, _ = start_run(tmp_path / "first", store)
    checkpoints.save(2)
    checkpoints.finish()
    (tmp_path / "store" / "checkpoints" / "step-00000002" / "model.pt").write_bytes(b"bit rot")
    with pytest.raises(JobInputError) as refusal:
        start_run(tmp_path / "fresh", store)
    objects = tmp_path / "store" / "checkpoints"
    assert str(refusal.value) == (
        f"{objects}: none of the run's checkpoints can be resumed from (step-00000002: "
        f"{objects}/step-00000002/model.pt does not match its manifest (size or SHA-256)); "
        f"restore them, or remove {objects} to start the run over from step 0"
    )


def test_a_checkpoint_from_a_different_layout_is_refused(tmp_path: Path) -> None:
    checkpoints, _, _ = start_run(tmp_path, layout={"ranks": 2})
    checkpoints.save(2)
    engine = FakeEngine()
    with pytest.raises(
        JobInputError, match=r"step-00000002: .* laid out differently \(ranks 2 -> 1\)"
    ):
        start_run(tmp_path, layout={"ranks": 1}, engine=engine)
    assert engine.loaded is None


def test_a_refused_checkpoint_is_named_where_the_user_keeps_it(tmp_path: Path) -> None:
    """With an `s3://` output the user knows the checkpoint in the store, not in the
    local cache it was fetched into."""
    store = LocalStore(tmp_path / "store")
    checkpoints, _, _ = start_run(tmp_path / "first", store, layout={"ranks": 2})
    checkpoints.save(2)
    checkpoints.finish()
    with pytest.raises(JobInputError) as refusal:
        start_run(tmp_path / "cache", store, layout={"ranks": 1})
    assert str(refusal.value).startswith(
        f"{tmp_path / 'store' / 'checkpoints' / 'step-00000002'}: this checkpoint was "
        "written by a run laid out differently (ranks 2 -> 1)"
    )


def test_a_checkpoint_of_another_trainer_version_is_refused_as_such(tmp_path: Path) -> None:
    # Written in DeepSpeed's bf16 mode, before the precision plan recorded itself.
    checkpoints, _, _ = start_run(tmp_path, layout={"ranks": 1, "spec.method": "lora"})
    checkpoints.save(2)
    layout = {"ranks": 1, "spec.method": "lora", "precisionPlan": "fp32-masters-autocast"}
    engine = FakeEngine()
    with pytest.raises(
        JobInputError,
        match=r"written by another version of the trainer.*"
        r"\(precisionPlan None -> fp32-masters-autocast\); finish the run with that version",
    ):
        start_run(tmp_path, layout=layout, engine=engine)
    assert engine.loaded is None


def test_a_checkpoint_of_another_model_is_refused_before_the_model_loads(
    tmp_path: Path,
) -> None:
    """`check_run`: the run's settings and models, before the model loads; the ZeRO
    stage and precision plan are left to `check_layout`, once the engine is set up."""
    uri = "s3://models/sd"
    run = {"ranks": 1, "spec.baseModel.uri": uri, "models": {"spec.baseModel.uri": "a1"}}
    checkpoints, _, _ = start_run(tmp_path, layout={**run, "zeroStage": 2})
    checkpoints.save(2)
    found = manifest.latest(tmp_path)
    assert found is not None
    where = str(found.folder)
    assert check_run(found, run, where) is True

    with pytest.raises(JobInputError) as refusal:
        check_run(found, {**run, "models": {"spec.baseModel.uri": "b2"}}, where)
    assert str(refusal.value) == (
        f"spec.baseModel.uri ({uri}): the files there are not those of the model checkpoint "
        f"{where} was trained on (the model was replaced since); restore that model, or "
        "remove the checkpoints to start over"
    )
    # Another URI is another spec: named as such, not as another model.
    moved = {"ranks": 1, "spec.baseModel.uri": "/models/sd", "models": {"spec.baseModel.uri": "b2"}}
    with pytest.raises(JobInputError, match=rf"laid out differently \(spec.baseModel.uri {uri} ->"):
        check_run(found, moved, where)


def test_a_checkpoint_that_records_no_models_still_resumes(tmp_path: Path) -> None:
    before = {"ranks": 1, "spec.method": "lora"}  # written before checkpoints named models
    checkpoints, _, _ = start_run(tmp_path, layout=before)
    checkpoints.save(2)
    found = manifest.latest(tmp_path)
    assert found is not None
    now = {**before, "models": {"spec.baseModel.uri": "a1"}}
    assert check_run(found, now, str(found.folder)) is False, "not checked, not refused"
    _, engine, step = start_run(tmp_path, layout=now)
    assert (step, engine.loaded) == (2, "step-00000002")


def test_a_max_steps_below_the_newest_checkpoint_is_refused(tmp_path: Path) -> None:
    found = manifest.Checkpoint(tmp_path / "step-00000008", 8)
    with pytest.raises(
        JobInputError,
        match=r"^spec.training.maxSteps: 3 is below step 8 of the newest checkpoint "
        r"\(.*step-00000008\); raise it to at least 8, or remove the checkpoints",
    ):
        check_max_steps(found, 3, str(found.folder))
    check_max_steps(
        found, 8, str(found.folder)
    )  # a finished run run again: it resumes at its last step


def test_disk_full_while_saving_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "step-00000004"
    with (
        pytest.raises(DiskFull, match=r"step 4.*previous checkpoint is intact"),
        space_checked(folder, 4),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")


BUCKET = "runs"


@pytest.mark.slow  # starts moto's S3 server
def test_checkpoints_become_durable_in_order_and_are_retained(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = moto.store(BUCKET)
    reported: list[tuple[str, int]] = []
    root = tmp_path / "checkpoints"
    checkpoints, _, _ = start_run(root, store, keep_last=2, reported=reported)
    for step in (2, 4, 6):
        checkpoints.save(step)
        checkpoints.poll()
    checkpoints.finish()
    assert [s for _, s in reported] == [2, 4, 6]
    assert reported[-1][0] == "s3://runs/job/checkpoints/step-00000006"
    tags = {key.split("/")[1] for key, _ in store.keys("checkpoints/")}
    assert tags == {"step-00000004", "step-00000006"}, "keep-last-2 applied in S3"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]
    document = json.loads(store.read_text("checkpoints/step-00000006/manifest.json") or "")
    assert [e["path"] for e in document["files"]] == ["model.pt", "rng-rank0000.pt"]
    assert checkpoints.uploads.bytes_sent > 0

    # A fresh machine: the newest durable checkpoint comes back from S3.
    _, engine, step = start_run(tmp_path / "fresh", store)
    assert step == 6
    assert engine.loaded == "step-00000006"
    folder = tmp_path / "fresh" / "step-00000006"
    assert (folder / "model.pt").read_bytes() == bytes([6]) * 100
    assert manifest.verify(folder) == 6


@pytest.mark.slow  # starts moto's S3 server
def test_a_corrupt_object_falls_back_to_the_previous_checkpoint(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = moto.store(BUCKET)
    checkpoints, _, _ = start_run(tmp_path / "checkpoints", store)
    for step in (2, 4):
        checkpoints.save(step)
    checkpoints.finish()
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"\xff" * 100)  # same size, other bytes
    store.put_file(damaged, "checkpoints/step-00000004/model.pt")
    _, _, step = start_run(tmp_path / "fresh", store)
    assert step == 2
    assert "s3://runs/job/checkpoints/step-00000004/model.pt does not match" in caplog.text


@pytest.mark.slow  # starts moto's S3 server
def test_a_checkpoint_without_manifest_is_never_used(moto: Moto, tmp_path: Path) -> None:  # noqa: F811
    store = moto.store(BUCKET)
    root = tmp_path / "checkpoints"
    checkpoints, _, _ = start_run(root, store)
    checkpoints.save(2)
    checkpoints.finish()
    make_checkpoint(root, 4, complete=False)  # as if killed mid-upload: files, no manifest
    store.put_file(root / "step-00000004" / "model.pt", "checkpoints/step-00000004/model.pt")
    _, _, step = start_run(tmp_path / "x", store)
    assert step == 2


class HungStore(LocalStore):
    """A store whose uploads hang until `answer` is set, as an S3 endpoint that stopped."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.answer = threading.Event()
        self.ended = False

    def end_process(self) -> None:
        """What a run's exit does to its hung uploads: they never write (in one test
        process, the thread would go on and race the next run's upload of the file)."""
        self.ended = True
        self.answer.set()

    def put_file(self, path: Path, key: str) -> None:
        self.answer.wait()
        if self.ended:
            raise RuntimeError("the process that made this upload has exited")
        super().put_file(path, key)


def leave_after(calls: int) -> Callable[[], None]:
    """A wait's check that leaves (as a second Ctrl-C does) on its `calls`-th call."""
    count = iter(range(calls, 0, -1))

    def check() -> None:
        if next(count) == 1:
            raise Stopped("stopped again")

    return check


def test_a_checkpoint_whose_upload_a_stop_left_is_resumed_from_and_sent(tmp_path: Path) -> None:
    root, store = tmp_path / "checkpoints", HungStore(tmp_path / "store")
    checkpoints, _, _ = start_run(root, store)
    checkpoints.save(2)
    checkpoints.poll()
    with pytest.raises(Stopped):
        checkpoints.finish(leave_after(3))
    assert checkpoints.unsent() == [2]
    store.end_process()  # S3 answers again; the next run is a new process

    reported: list[tuple[str, int]] = []
    fresh = LocalStore(tmp_path / "store")
    checkpoints, engine, step = start_run(root, fresh, reported=reported)
    assert step == 2
    assert engine.loaded == "step-00000002"
    checkpoints.finish()
    assert reported == [(fresh.uri_of("checkpoints/step-00000002"), 2)]
    assert (tmp_path / "store" / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    assert not list(root.glob("*.unsent"))


def test_a_left_checkpoint_older_than_the_stores_newest_is_not_used(tmp_path: Path) -> None:
    root, store = tmp_path / "checkpoints", LocalStore(tmp_path / "store")
    make_checkpoint(root, 2)
    (root / "step-00000002.unsent").touch()
    checkpoints, _, _ = start_run(tmp_path / "elsewhere", store)
    checkpoints.save(4)
    checkpoints.finish()
    _, engine, step = start_run(root, store)
    assert step == 4
    assert engine.loaded == "step-00000004"
    assert not (root / "step-00000002.unsent").exists()


def test_a_full_disk_while_saving_the_results_says_a_rerun_trains_no_step(
    tmp_path: Path,
) -> None:
    """Not the checkpoint's advice: every checkpoint is there, the last step's too."""
    import errno

    from finetune.trainer.checkpoints.space import RESULTS_ADVICE, space_checked
    from finetune.trainer.errors import DiskFull

    with pytest.raises(DiskFull) as full, space_checked(tmp_path, 7, "the results", RESULTS_ADVICE):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(full.value) == (
        f"{tmp_path}: no space left to save the results of step 7 (No space left on device). "
        "Every checkpoint is intact; give the job more local disk (or lower "
        "spec.checkpointing.keepLast) and run it again: it trains no step and saves them"
    )
