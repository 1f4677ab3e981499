"""The output may not lie inside (or be) a folder the job reads: weights, checkpoints,
samples and the model card would land among the photos, and a dataset read
recursively would train on its own samples. Nor may a concept's class images be kept in
a concept's own photo folder: generated ones would be trained on as the subject."""

from __future__ import annotations

from pathlib import Path

from finetune.api.common import is_hub, is_s3
from finetune.api.training import TrainingSpec, evaluator_uris
from finetune.trainer.errors import JobInputError

OUTPUT_FIELD = "spec.output.uri"


def inputs_of(spec: TrainingSpec) -> list[tuple[str, str]]:
    """(field, uri) of every folder the job reads."""
    found = [("spec.baseModel.uri", spec.base_model.uri)]
    if spec.lcm is not None and spec.lcm.teacher_model is not None:
        found.append(("spec.lcm.teacherModel.uri", spec.lcm.teacher_model.uri))
    for index, concept in enumerate(spec.data.concepts):
        found.append((f"spec.data.concepts[{index}].instanceImages", concept.instance_images))
        if concept.class_images.uri:
            found.append((f"spec.data.concepts[{index}].classImages.uri", concept.class_images.uri))
    if spec.data.dataset is not None:
        found.append(("spec.data.dataset.uri", spec.data.dataset.uri))
    found += [(f"spec.{field}", uri) for field, uri in evaluator_uris(spec).items()]
    return found


def _s3_parts(uri: str) -> tuple[str, ...]:
    """Bucket, then the key's folder names: `s3://b/x/y/` -> ("b", "x", "y")."""
    return tuple(part for part in uri.removeprefix("s3://").split("/") if part)


def placement(output: str, folder: str) -> str | None:
    """How `output` relates to `folder`: "is" it, "is inside" it, or None.
    Local paths are compared after resolving `~`, `..` and symlinks; S3 prefixes
    folder by folder (`s3://b/photos2` is not inside `s3://b/photos`)."""
    if is_hub(output) or is_hub(folder) or is_s3(output) != is_s3(folder):
        return None
    inner: tuple[str, ...]
    outer: tuple[str, ...]
    if is_s3(output):
        inner, outer = _s3_parts(output), _s3_parts(folder)
    else:
        inner = Path(output).expanduser().resolve().parts
        outer = Path(folder).expanduser().resolve().parts
    if inner[: len(outer)] != outer:
        return None
    return "is" if len(inner) == len(outer) else "is inside"


def check_output_apart(spec: TrainingSpec, output: str) -> None:
    """JobInputError (exit 2) naming both fields when `output` lies in an input folder."""
    for field, uri in inputs_of(spec):
        where = placement(output, uri)
        if where is not None:
            where = "is the same folder as" if where == "is" else where
            raise JobInputError(
                f"{OUTPUT_FIELD}: {output} {where} {field} ({uri}); results, checkpoints "
                "and samples would land among the job's inputs: choose an output folder "
                "outside every input"
            )


def check_class_images_apart(spec: TrainingSpec) -> None:
    """JobInputError naming both fields when, with prior preservation, a
    `classImages.uri` is the folder of a concept's `instanceImages`."""
    if not spec.training.prior_preservation:
        return
    for index, concept in enumerate(spec.data.concepts):
        classes = concept.class_images.uri
        if classes is None:
            continue
        for other, photos in enumerate(spec.data.concepts):
            if placement(classes, photos.instance_images) == "is":
                raise JobInputError(
                    f"spec.data.concepts[{index}].classImages.uri: {classes} is the same "
                    f"folder as spec.data.concepts[{other}].instanceImages; class images "
                    "would be trained on as the subject: keep them in a folder of their own"
                )
