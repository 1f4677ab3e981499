"""What must be the same for a checkpoint to continue a run: the ranks, the spec except
what may change between runs (more steps, checkpoints, samples, the output), the models
it was trained on (their fingerprints, `models.fingerprint`), and how the engine stores
its state (the ZeRO stage, the precision plan).

The ranks, the spec and the models are known before the model loads: `check_run` refuses
a checkpoint that differs in them as soon as it is found, in seconds. The rest is known
once the engine is set up, and checked then (`check_layout`).
"""

from __future__ import annotations

from typing import Any

from finetune.api.training import TrainingSpec
from finetune.trainer.checkpoints.manifest import Checkpoint, layout_of
from finetune.trainer.errors import JobInputError

CHANGEABLE = ("checkpointing", "validation", "output")
# The layout's fingerprint of each model input, by the spec field naming it.
MODELS = "models"


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: value}


# Where checkpoints before the stage could be left to the trainer recorded it.
_SPEC_ZERO_STAGE = "spec.deepspeed.zeroStage"


def run_layout(spec: TrainingSpec, world: int, models: dict[str, str]) -> dict[str, Any]:
    """What a run is before its model loads: its ranks, its spec but for what may change,
    and `models` (`RunPlan.model_fingerprints`)."""
    fields = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    fields["training"].pop("maxSteps", None)
    fields["deepspeed"].pop("zeroStage", None)
    for changeable in CHANGEABLE:
        fields.pop(changeable, None)
    return {"ranks": world, MODELS: models, **_flatten(fields, "spec")}


def layout_for(
    spec: TrainingSpec, world: int, zero_stage: int, models: dict[str, str]
) -> dict[str, Any]:
    """`zero_stage`: the stage the run trains under, whether the job set it or not."""
    return {**run_layout(spec, world, models), "zeroStage": zero_stage}


def _saved_layout(found: Checkpoint) -> dict[str, Any]:
    saved = layout_of(found)
    if _SPEC_ZERO_STAGE in saved:
        saved["zeroStage"] = saved.pop(_SPEC_ZERO_STAGE)
    return saved


def zero_stage_of(found: Checkpoint) -> int | None:
    """The ZeRO stage `found` was written under (its optimizer state is laid out so)."""
    stage = _saved_layout(found).get("zeroStage")
    return int(stage) if stage is not None else None


def _user_settings(key: str) -> bool:
    return key in ("ranks", "zeroStage") or key.startswith("spec.")


def _run_settings(key: str) -> bool:
    """Known before the model loads (`run_layout`)."""
    return key == "ranks" or key.startswith("spec.")


def check_run(found: Checkpoint, layout: dict[str, Any], where: str) -> bool:
    """Before the model loads: refuse a checkpoint of a run with other ranks, another spec
    or other models than this one's `run_layout`. False when the checkpoint records no
    models (an earlier trainer wrote it): they could not be checked. `where`: the
    checkpoint as the user knows it (`RunCheckpoints.location`)."""
    saved = _saved_layout(found)
    trained_on: dict[str, str] | None = saved.pop(MODELS, None)
    settings = {k: v for k, v in saved.items() if _run_settings(k)}
    _refuse_differences(settings, _without_models(layout), where)
    if trained_on is None:
        return False
    changed = [
        field
        for field, digest in layout[MODELS].items()
        if field in trained_on and trained_on[field] != digest
    ]
    if changed:
        named = " and ".join(f"{field} ({layout.get(field)})" for field in changed)
        raise JobInputError(
            f"{named}: the files there are not those of the model checkpoint {where} was "
            "trained on (the model was replaced since); restore that model, or remove the "
            "checkpoints to start over"
        )
    return True


def check_layout(found: Checkpoint, layout: dict[str, Any], where: str) -> None:
    """Once the engine is set up: refuse, naming each difference, a checkpoint written by
    a run laid out otherwise: by other settings (a ZeRO stage), or by a trainer that
    stored its state another way. `where`: as for `check_run`, which checks the models."""
    saved = _without_models(_saved_layout(found))
    _refuse_differences(saved, _without_models(layout), where)


def _without_models(layout: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in layout.items() if k != MODELS}


def _refuse_differences(saved: dict[str, Any], layout: dict[str, Any], where: str) -> None:
    """Refuse, naming each difference, a checkpoint whose `saved` layout is not `layout`:
    by the user's settings, or by how an earlier trainer stored its state."""
    if not saved or saved == layout:
        return
    changed = [k for k in layout if saved.get(k) != layout[k]]
    changed += [k for k in saved if k not in layout]
    differences = ", ".join(f"{k} {saved.get(k)} -> {layout.get(k)}" for k in changed)
    if not any(_user_settings(k) for k in changed):
        raise JobInputError(
            f"{where}: this checkpoint was written by another version of the trainer, "
            f"which stored its state differently ({differences}); finish the run with that "
            "version, or remove the checkpoints to start over"
        )
    raise JobInputError(
        f"{where}: this checkpoint was written by a run laid out differently ({differences}); "
        "run with the same settings, or remove the checkpoints to start over"
    )


def check_max_steps(found: Checkpoint, max_steps: int, where: str) -> None:
    """Refuse a `training.maxSteps` below the step of the checkpoint resumed from: the run
    cannot go back, and its results would be a later step's weights. `where`: the
    checkpoint as the user knows it (`RunCheckpoints.location`)."""
    if max_steps < found.step:
        raise JobInputError(
            f"spec.training.maxSteps: {max_steps} is below step {found.step} of the newest "
            f"checkpoint ({where}); raise it to at least {found.step}, or remove the "
            "checkpoints to start over"
        )
