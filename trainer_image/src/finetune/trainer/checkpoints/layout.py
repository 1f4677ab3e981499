"""What must be the same for a checkpoint to continue a run: the ranks and the spec,
except what may change between runs (more steps, checkpoints, samples, the output)."""

from __future__ import annotations

from typing import Any

from finetune.api.training import TrainingSpec
from finetune.trainer.checkpoints.manifest import Checkpoint, layout_of
from finetune.trainer.errors import JobInputError

CHANGEABLE = ("checkpointing", "validation", "output")


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: value}


# Where checkpoints before the stage could be left to the trainer recorded it.
_SPEC_ZERO_STAGE = "spec.deepspeed.zeroStage"


def layout_for(spec: TrainingSpec, world: int, zero_stage: int) -> dict[str, Any]:
    """`zero_stage`: the stage the run trains under, whether the job set it or not."""
    fields = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    fields["training"].pop("maxSteps", None)
    fields["deepspeed"].pop("zeroStage", None)
    for changeable in CHANGEABLE:
        fields.pop(changeable, None)
    return {"ranks": world, "zeroStage": zero_stage, **_flatten(fields, "spec")}


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


def check_layout(found: Checkpoint, layout: dict[str, Any], where: str) -> None:
    """Refuse, naming each difference, a checkpoint written by a run laid out otherwise:
    by other settings, or by a trainer that stored its state another way. `where`: the
    checkpoint as the user knows it (`RunCheckpoints.location`)."""
    saved = _saved_layout(found)
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
