"""Model families by the name `spec.baseModel.family` gives, and how `auto` finds one."""

from __future__ import annotations

from pathlib import Path

from finetune.trainer.data.geometry import ImageGeometry
from finetune.trainer.errors import JobInputError
from finetune.trainer.families.base import Components, ModelFamily, read_model_index
from finetune.trainer.families.sd import StableDiffusion
from finetune.trainer.families.sdxl import StableDiffusionXL

FIELD = "spec.baseModel.family"
AUTO = "auto"
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL())}
BY_PIPELINE = {f.pipeline_class: f for f in FAMILIES.values()}


def family_named(name: str) -> ModelFamily:
    return FAMILIES[name]


def pipeline_class_of(folder: Path) -> str | None:
    """The pipeline class a diffusers folder's `model_index.json` names, if it names one."""
    name = (read_model_index(folder) or {}).get("_class_name")
    return name if isinstance(name, str) else None


def known() -> str:
    return ", ".join(f"{f.pipeline_class} ({f.name})" for f in FAMILIES.values())


def resolve_family(requested: str, folder: Path, uri: str) -> ModelFamily:
    """The family `requested` (`auto`: the one `model_index.json` names) for the model
    in `folder`, checked against the folder; refusals name the field."""
    found = pipeline_class_of(folder)
    if requested == AUTO:
        if found not in BY_PIPELINE:
            raise JobInputError(
                f"{FIELD}: auto: {uri} holds a {found or 'pipeline of no named class'} "
                f"(model_index.json), which this trainer cannot train; it trains {known()}"
            )
        family = BY_PIPELINE[found]
    else:
        family = FAMILIES[requested]
        other = BY_PIPELINE.get(found or "")
        if other is not None and other is not family:
            raise JobInputError(
                f"{FIELD}: {requested}, but {uri} holds a {found} ({other.name}); "
                f"use {other.name} or auto"
            )
    missing = [part for part in family.parts if not (folder / part).exists()]
    if missing:
        raise JobInputError(
            f"{FIELD}: {family.name}: {uri} is not a {family.pipeline_class} folder "
            f"(missing {', '.join(missing)})"
        )
    return family


def check_same_family(family: ModelFamily, folder: Path, uri: str, field: str) -> None:
    """Refuse a second model (`field`, e.g. LCM's teacher) whose `model_index.json` names
    a pipeline other than the base model's family; one naming none is left to the
    method's own checks of its parts."""
    found = pipeline_class_of(folder)
    if found is not None and found != family.pipeline_class:
        other = BY_PIPELINE.get(found)
        named = f"{found} ({other.name})" if other else found
        raise JobInputError(
            f"{field}: {uri} holds a {named}, but the base model is a "
            f"{family.pipeline_class} ({family.name}); it must be of the same family"
        )


def detect(folder: Path) -> ModelFamily:
    """The family a checked model folder belongs to (SD unless it names another)."""
    return BY_PIPELINE.get(pipeline_class_of(folder) or "", FAMILIES["sd"])


__all__ = [
    "AUTO",
    "FAMILIES",
    "FIELD",
    "Components",
    "ImageGeometry",
    "ModelFamily",
    "check_same_family",
    "detect",
    "family_named",
    "resolve_family",
]
