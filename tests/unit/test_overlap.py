"""The output may be neither an input folder nor inside one, locally or on S3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune.api.job import FineTuneJob
from finetune.api.training import TrainingSpec
from finetune.trainer.errors import JobInputError, exit_code_for
from finetune.trainer.launcher.overlap import check_output_apart, placement
from tests.support import lcm_job, lora_job


def test_local_paths_are_compared_after_resolving(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (tmp_path / "link").symlink_to(photos)
    assert placement(str(photos), str(photos)) == "is"
    assert placement(str(photos) + "/", str(photos)) == "is"
    assert placement(str(photos / "out"), str(photos)) == "is inside"
    assert placement(str(tmp_path / "link" / "out"), str(photos)) == "is inside"
    assert placement(str(photos / ".." / "photos" / "out"), str(photos)) == "is inside"
    assert placement(str(tmp_path / "photos2"), str(photos)) is None
    assert placement(str(tmp_path), str(photos)) is None  # the inputs inside the output: fine


def test_s3_prefixes_are_compared_folder_by_folder() -> None:
    assert placement("s3://b/photos", "s3://b/photos/") == "is"
    assert placement("s3://b/photos/run1", "s3://b/photos") == "is inside"
    assert placement("s3://b/anything", "s3://b") == "is inside"
    assert placement("s3://b/photos2", "s3://b/photos") is None
    assert placement("s3://other/photos", "s3://b/photos") is None
    assert placement("/data/photos", "s3://b/photos") is None
    assert placement("s3://b/x", "hf://org/model") is None


CONCEPT = {"instanceImages": "./dog", "instancePrompt": "a photo of sks dog"}


def spec_of(document: dict[str, Any]) -> TrainingSpec:
    return FineTuneJob.model_validate(document).spec.training_spec()


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (lora_job(output={"uri": "./dog/out"}), "spec.data.concepts[0].instanceImages"),
        (
            lora_job(
                data={"concepts": [{**CONCEPT, "classImages": {"uri": "s3://bucket/cls"}}]},
                output={"uri": "s3://bucket/cls"},
            ),
            "spec.data.concepts[0].classImages.uri",
        ),
        (lcm_job(output={"uri": "s3://data/shards/out"}), "spec.data.dataset.uri"),
        (
            lora_job(baseModel={"uri": "s3://bucket/model"}, output={"uri": "s3://bucket/model"}),
            "spec.baseModel.uri",
        ),
    ],
)
def test_an_output_among_the_inputs_is_refused_naming_both_fields(
    document: dict[str, Any], field: str
) -> None:
    spec = spec_of(document)
    output = spec.output.uri
    with pytest.raises(JobInputError) as error:
        check_output_apart(spec, output)
    message = str(error.value)
    assert message.startswith(f"spec.output.uri: {output} is")
    assert field in message
    assert exit_code_for(error.value) == 2


def test_an_output_beside_the_inputs_passes() -> None:
    spec = spec_of(lora_job(output={"uri": "./out"}))
    check_output_apart(spec, "./out")
    check_output_apart(spec, "s3://bucket/dog")


def test_the_same_folder_is_called_so() -> None:
    spec = spec_of(lora_job(output={"uri": "./dog/"}))
    with pytest.raises(JobInputError, match=r"^spec\.output\.uri: \./dog/ is the same folder as "):
        check_output_apart(spec, "./dog/")
