"""Class images topped up into a folder with a gap (an image removed, or one a killed run
made and a fresh machine never fetched) take new names: none overwrites an image there."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.api.training import TrainingSpec
from finetune.trainer.data import class_images
from finetune.trainer.errors import JobInputError
from tests.support import lora_job
from tests.unit.test_liveness import Pipeline


def test_topping_up_a_folder_with_a_gap_overwrites_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = lora_job()
    concept = document["spec"]["data"]["concepts"][0]
    concept.update(classPrompt="a photo of a disc", classImages={"count": 4})
    spec = TrainingSpec.model_validate(document["spec"])
    tag = hashlib.sha1(b"a photo of a disc").hexdigest()[:8]
    folder = tmp_path / "class"
    folder.mkdir()
    for number, colour in ((0, "red"), (2, "blue")):  # number 1 is gone
        Image.new("RGB", (8, 8), colour).save(folder / f"class-{tag}-{number:05d}.png")
    kept = (folder / f"class-{tag}-00002.png").read_bytes()
    monkeypatch.setattr(class_images, "inference_pipeline", lambda components: Pipeline(1))
    saved: list[Path] = []

    class_images.generate_missing(
        spec,
        None,  # type: ignore[arg-type] - the pipeline above needs no components
        [folder],
        torch.device("cpu"),
        torch.float32,
        saved=lambda index, image: saved.append(image),
    )

    assert len(list(folder.glob("*.png"))) == 4
    assert (folder / f"class-{tag}-00002.png").read_bytes() == kept
    assert [p.name for p in saved] == [f"class-{tag}-00003.png", f"class-{tag}-00004.png"]


def test_a_bad_class_image_from_s3_is_named_by_its_key(tmp_path: Path) -> None:
    """Class images at an S3 prefix are read from the cache's copy; a refusal names the
    object the user can find, not the cache's path."""
    from finetune.trainer.data.batches import class_examples
    from finetune.trainer.data.class_homes import ClassHome

    document = lora_job()
    concept = document["spec"]["data"]["concepts"][0]
    concept.update(classPrompt="a photo of a disc", classImages={"uri": "s3://photos/classes/"})
    spec = TrainingSpec.model_validate(document["spec"])
    folder = tmp_path / "cache" / "s3-class-images" / "abc"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    (folder / "b.png").write_bytes(b"half a png")
    field = "spec.data.concepts[0].classImages.uri"
    with pytest.raises(JobInputError) as refused:
        class_examples(spec, [ClassHome(folder, "s3://photos/classes/", field)])
    assert str(refused.value).startswith(
        f"{field}: s3://photos/classes/b.png: not a readable image"
    )
    assert str(tmp_path) not in str(refused.value)
