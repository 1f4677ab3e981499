"""Choosing by a validation metric, as pure functions: the best validation, the patience
of early stopping, and the best checkpoint kept by retention."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from finetune.api.selection import EarlyStopping, KeepBest, OutputFrom
from finetune.api.training import TrainingSpec
from finetune.trainer.checkpoints import manifest, run_checkpoints
from finetune.trainer.engine.trainer import Trainer
from finetune.trainer.evaluation.scores import Scores, settings_basis
from finetune.trainer.evaluation.selection import (
    Selection,
    best_of,
    from_manifest,
    stalled,
    to_manifest,
)
from finetune.trainer.process.distributed import Rank
from tests.trainer.s3faults import Moto, moto  # noqa: F401 - the fixture
from tests.unit.test_checkpoints import start_run


def run(*values: float, metric: str = "dino") -> list[Scores]:
    return [Scores(10 * (i + 1), {metric: v}) for i, v in enumerate(values)]


def test_the_best_is_the_highest_or_lowest_and_the_earliest_of_equals() -> None:
    history = run(0.5, 0.7, 0.7, 0.6)
    best = best_of(history, "dino", "max")
    assert best is not None
    assert best.step == 20
    lowest = best_of(history, "dino", "min")
    assert lowest is not None
    assert lowest.step == 10
    assert best_of(history, "clipText", "max") is None


def test_early_stopping_waits_patience_validations_without_an_improvement() -> None:
    rule = EarlyStopping(metric="dino", patience=2, min_delta=0.05)
    assert stalled(run(0.5, 0.6, 0.62), rule) is None  # 0.62: not better by 0.05; one so far
    stall = stalled(run(0.5, 0.6, 0.62, 0.64, 0.9), rule)
    assert stall is not None
    assert (stall.best.step, stall.since, stall.last_step) == (20, 2, 40)
    falling = EarlyStopping(metric="dino", mode="min", patience=1)
    assert stalled(run(0.5, 0.4, 0.3), falling) is None
    flat = stalled(run(0.5, 0.5), falling)
    assert flat is not None
    assert flat.best.step == 10


def test_a_manifest_carries_the_validations_a_resumed_run_starts_from(tmp_path: Path) -> None:
    spec = spec_with(keepBest={"metric": "dino"})
    selection = Selection(spec, [])
    for scores in run(0.5, 0.8, 0.6):
        selection.add(scores)
    selection.add(Scores(30, {"dino": 0.9}))  # a step scored again replaces its scores
    manifest.write_manifest(tmp_path, 30, {}, [], selection.manifest_entries())
    resumed = Selection(spec, from_manifest(manifest.validations_of(tmp_path)))
    assert [s.step for s in resumed.history] == [10, 20, 30]
    best = resumed.best()
    assert best is not None
    assert best.step == 30
    assert from_manifest(to_manifest(resumed.history)) == resumed.history
    assert manifest.validations_of(tmp_path / "nothing") == []


def spec_with(**checkpointing: object) -> TrainingSpec:
    return TrainingSpec.model_validate(
        {
            "method": "lora",
            "baseModel": {"uri": "/models/tiny"},
            "data": {"concepts": [{"instanceImages": "/data", "instancePrompt": "a sks disc"}]},
            "validation": {"prompts": ["a sks disc"], "metrics": ["dino"]},
            "checkpointing": checkpointing,
            "output": {"uri": "/out"},
        }
    )


def test_the_settings_basis_follows_what_a_figure_depends_on() -> None:
    spec = spec_with()
    same = settings_basis(spec)
    for changed, differs in (
        ({"prompts": ["a sks disc", "a sks disc on a beach"]}, True),
        ({"imagesPerPrompt": 8}, True),
        ({"inferenceSteps": 50}, True),
        ({"evaluator": {"dinoModel": "/models/dinov2-large"}}, True),
        ({"everyNSteps": 50}, False),  # when validations happen, not what they measure
        ({"metrics": ["dino", "clipText"]}, False),  # another figure, the same dino
    ):
        validation = {**spec.validation.model_dump(by_alias=True, exclude_none=True), **changed}
        other = spec.model_copy(
            update={"validation": type(spec.validation).model_validate(validation)}
        )
        assert (settings_basis(other) != same) is differs, changed


def test_the_identifiers_clip_text_leaves_out_are_part_of_the_basis() -> None:
    """Earlier versions scored clipText with `sks` in the prompt: a figure of another
    text, not to be weighed against one without it."""
    spec = spec_with()
    concept = {"instanceImages": "/data", "instancePrompt": "a sks disc", "classPrompt": "a disc"}
    named = spec.model_copy(
        update={"data": type(spec.data).model_validate({"concepts": [concept]})}
    )
    assert settings_basis(named) != settings_basis(spec)


def test_validations_scored_with_other_settings_are_not_weighed(tmp_path: Path) -> None:
    """A resume changed the prompts after steps 10 and 20: their scores (0.9 the highest)
    are kept and listed, but the best and early stopping weigh only the new settings'."""
    spec = spec_with(keepBest={"metric": "dino"})
    earlier = [Scores(s.step, s.overall, basis="before") for s in run(0.9, 0.9)]
    now = settings_basis(spec)
    later = [Scores(30, {"dino": 0.5}, basis=now), Scores(40, {"dino": 0.6}, basis=now)]
    legacy = Scores(5, {"dino": 0.99})  # from a version that kept no basis: weighed as before
    selection = Selection(spec, [*earlier, *later, legacy], now)
    assert selection.set_aside() == [10, 20]
    assert [s.step for s in selection.comparable()] == [5, 30, 40]
    assert [s.step for s in selection.history] == [5, 10, 20, 30, 40]
    best = Selection(spec, [*earlier, *later], now).best()
    assert best is not None
    assert best.step == 40
    manifest.write_manifest(tmp_path, 40, {}, [], selection.manifest_entries())
    resumed = from_manifest(manifest.validations_of(tmp_path))
    assert [s.basis for s in resumed] == [None, "before", "before", now, now]
    rule = EarlyStopping(metric="dino", patience=2)
    assert stalled(earlier + later[:1], rule) is not None  # 0.9, 0.9, 0.5: stalled if weighed
    stopping = spec.model_copy(
        update={"training": spec.training.model_copy(update={"early_stopping": rule})}
    )
    assert Selection(stopping, [*earlier, *later], now).stall() is None


def test_local_retention_keeps_the_best_besides_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    checkpoints, _, _ = start_run(root, keep_last=1, keep_best=KeepBest(metric="dino"))
    history = run(0.5, 0.9, 0.6, 0.7)
    for index, scores in enumerate(history):
        checkpoints.save(scores.step, to_manifest(history[: index + 1]))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000020", "step-00000040"]


def test_retention_keeps_the_best_of_the_scores_made_with_the_runs_settings(
    tmp_path: Path,
) -> None:
    """Step 20 scored 0.9 with the settings before a resume changed them: retention keeps
    step 40, the best of this run's scores, not step 20."""
    root = tmp_path / "checkpoints"
    checkpoints, _, _ = start_run(root, keep_last=1, keep_best=KeepBest(metric="dino"), basis="now")
    history = [
        Scores(10, {"dino": 0.5}, basis="before"),
        Scores(20, {"dino": 0.9}, basis="before"),
        Scores(30, {"dino": 0.6}, basis="now"),
        Scores(40, {"dino": 0.7}, basis="now"),
        Scores(50, {"dino": 0.65}, basis="now"),
    ]
    for index, scores in enumerate(history):
        checkpoints.save(scores.step, to_manifest(history[: index + 1]))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000040", "step-00000050"]


@pytest.mark.slow  # starts moto's S3 server
def test_the_best_checkpoint_outlives_keep_last_in_s3_and_comes_back(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = moto.store("runs")
    keep = KeepBest(metric="dino", mode="min")
    checkpoints, _, _ = start_run(tmp_path / "checkpoints", store, keep_last=1, keep_best=keep)
    history = run(0.5, 0.2, 0.6)
    for index, scores in enumerate(history):
        checkpoints.save(scores.step, to_manifest(history[: index + 1]))
        checkpoints.poll()
    checkpoints.finish()
    tags = {key.split("/")[1] for key, _ in store.keys("checkpoints/")}
    assert tags == {"step-00000020", "step-00000030"}

    # A fresh machine resumes from the newest; the best comes back from S3 when asked.
    fresh, engine, step = start_run(tmp_path / "fresh", store, keep_best=keep)
    assert step == 30
    assert not (tmp_path / "fresh" / "step-00000020").exists()
    assert fresh.best_tag(30) == "step-00000020"
    assert fresh.load(20)
    assert engine.loaded == "step-00000020"
    assert manifest.verify(tmp_path / "fresh" / "step-00000020") == 20
    assert not fresh.load(10)  # pruned long ago


def test_a_keep_best_changed_on_resume_chooses_the_best_whose_weights_are_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first run keeps the best by clipText; run again with `dino`, `mode: min`, whose
    best (step 20) retention deleted: the result is step 10's, the best by dino of the
    kept checkpoints and the last step, and the card and `Done:` line say so."""
    root = tmp_path / "checkpoints"
    first, _, _ = start_run(root, keep_last=1, keep_best=KeepBest(metric="clipText"))
    dino = [0.25, 0.2, 0.3, 0.45]
    history = [
        Scores(10 * (i + 1), {"dino": d, "clipText": 0.9 - i / 10}) for i, d in enumerate(dino)
    ]
    for index, scores in enumerate(history):
        first.save(scores.step, to_manifest(history[: index + 1]), loss=1.0 + index / 10)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000010", "step-00000040"]

    keep = KeepBest(metric="dino", mode="min")
    checkpoints, engine, step = start_run(root, keep_last=1, keep_best=keep)
    spec = spec_with(keepBest={"metric": "dino", "mode": "min"})
    spec.output.from_ = OutputFrom.BEST
    trainer = Trainer.__new__(Trainer)
    trainer.spec, trainer.rank, trainer.checkpoints = spec, Rank(0, 0, 1), checkpoints
    trainer.selection = Selection(spec, history)
    caplog.set_level(logging.WARNING)
    chosen = trainer._best_weights(step, 1.3)
    assert chosen is not None
    assert (chosen.scores.step, chosen.loss) == (10, 1.0)
    assert chosen.gone is not None
    assert chosen.gone.step == 20
    assert engine.loaded == "step-00000010"
    assert (
        "the checkpoint of step 20, the best validation by dino, is gone; the result is the "
        "weights of step 10" in caplog.text
    )
    assert "cut short" not in caplog.text  # a checkpoint retention deleted is not a crash's


def test_a_checkpoint_half_deleted_by_retention_is_never_taken_for_a_save_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "checkpoints"
    checkpoints, _, _ = start_run(root, keep_last=1)
    # A deletion that leaves everything behind (a crash, NFS's `.nfs*` files).
    monkeypatch.setattr(run_checkpoints.shutil, "rmtree", lambda *_, **__: None)
    checkpoints.save(10)
    checkpoints.save(20)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step-00000020"]
    caplog.set_level(logging.WARNING)
    assert manifest.latest(root) == manifest.Checkpoint(root / "step-00000020", 20)
    assert caplog.text == ""
    monkeypatch.undo()
    checkpoints.save(30)  # the next retention deletes the remains
    assert sorted(p.name for p in root.iterdir()) == ["step-00000030"]
