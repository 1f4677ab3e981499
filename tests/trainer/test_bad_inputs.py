"""Bad input fails fast with an error naming the path, and leaves no finished-looking output."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer.jobs import job_file, prior_preservation_job, refused


def concept(images: Path) -> dict[str, object]:
    return {"concepts": [{"instanceImages": str(images), "instancePrompt": "a photo of sks disc"}]}


def assert_no_output(folder: Path) -> None:
    out = folder / "out"
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert not (out / "README.md").exists()


def test_missing_data_folder(tmp_path: Path, tiny_model: Path) -> None:
    missing = tmp_path / "no-such-folder"
    job = job_file(tmp_path, tiny_model, missing)
    refused(job, "spec.data.concepts[0].instanceImages", str(missing), "no such folder")
    assert_no_output(tmp_path)


def test_empty_dataset(tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    job = job_file(tmp_path, tiny_model, empty)
    refused(job, str(empty), "no images")
    assert_no_output(tmp_path)


def test_unreadable_image(tmp_path: Path, tiny_model: Path, disc_images: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted(disc_images.glob("*.png"))[:2]:
        (images / source.name).write_bytes(source.read_bytes())
    broken = images / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    job = job_file(tmp_path, tiny_model, images)
    refused(job, str(broken), "not a readable image")
    assert_no_output(tmp_path)


def test_folder_that_is_not_a_diffusers_model(tmp_path: Path, disc_images: Path) -> None:
    not_a_model = tmp_path / "weights"
    not_a_model.mkdir()
    (not_a_model / "model.safetensors").write_bytes(b"")
    job = job_file(tmp_path, not_a_model, disc_images)
    refused(
        job,
        str(not_a_model),
        "not a diffusers Stable Diffusion folder",
        "model_index.json",
    )
    assert_no_output(tmp_path)


@pytest.mark.parametrize(
    "uri", ["hf://no-such-org/no-such-model", "hf://no-such-org/no-such-model@v1"]
)
def test_unknown_hub_repo(tmp_path: Path, disc_images: Path, uri: str) -> None:
    job = job_file(tmp_path, tmp_path, disc_images, baseModel={"uri": uri})
    # No hub can be reached from here; offline mode answers at once instead of timing out.
    refused(job, uri, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_no_output(tmp_path)


def copied_images(tmp_path: Path, disc_images: Path, count: int = 2) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted(disc_images.glob("*.png"))[:count]:
        (images / source.name).write_bytes(source.read_bytes())
    return images


def test_an_output_inside_the_instance_folder(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    images = copied_images(tmp_path, disc_images)
    job = job_file(tmp_path, tiny_model, images, output={"uri": str(images / "out")})
    refused(
        job,
        f"spec.output.uri: {images / 'out'} is inside",
        f"spec.data.concepts[0].instanceImages ({images})",
    )
    assert (
        sorted(p.name for p in images.iterdir())
        == sorted(p.name for p in disc_images.glob("*.png"))[:2]
    ), "nothing may be written among the photos"


def test_images_refused_by_the_data_settings(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    from PIL import Image

    images = copied_images(tmp_path, disc_images)
    tiny = images / "tiny.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tiny)
    job = job_file(tmp_path, tiny_model, images, data={"minImageSize": 32})
    refused(job, str(tiny), "8x8", "spec.data.minImageSize")

    tiny.unlink()
    logo = images / "logo.png"
    Image.new("RGBA", (64, 64), (255, 0, 0, 100)).save(logo)
    job = job_file(tmp_path, tiny_model, images, data={"alpha": "refuse"})
    refused(job, str(logo), "transparent", "spec.data.alpha")
    assert_no_output(tmp_path)


def test_class_images_kept_among_the_subjects_photos_are_refused(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    """Generated class images would land among the photos and be trained on as the
    subject."""
    photos = tmp_path / "discs"
    photos.mkdir()
    for source in sorted(disc_images.glob("*.png")):
        (photos / source.name).write_bytes(source.read_bytes())
    before = sorted(p.name for p in photos.iterdir())

    def job(classes: Path) -> Path:
        return prior_preservation_job(
            tmp_path,
            tiny_model,
            photos,
            str(classes),
            training={"maxSteps": 1},
            checkpointing={"everyNSteps": 1},
        )

    refused(
        job(photos),
        "spec.data.concepts[0].classImages.uri",
        "is the same folder as spec.data.concepts[0].instanceImages",
    )
    assert sorted(p.name for p in photos.iterdir()) == before, "nothing was generated there"
    assert_no_output(tmp_path)


def test_custom_diffusion_captions_without_the_modifier_token_are_refused(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    """The token's embedding learns only from prompts that hold it: captions that leave
    it out would train a concept nobody can call up."""
    photos = tmp_path / "discs"
    photos.mkdir()
    for source in sorted(disc_images.glob("*.png")):
        (photos / source.name).write_bytes(source.read_bytes())
    first = sorted(photos.glob("*.png"))[0]
    first.with_suffix(".txt").write_text("a <disc> on a table")  # holds it: fine
    second = sorted(photos.glob("*.png"))[1]
    second.with_suffix(".txt").write_text("a disc on grass")
    job = job_file(
        tmp_path,
        tiny_model,
        photos,
        method="customDiffusion",
        lora=None,
        customDiffusion={"modifierTokens": ["<disc>"]},
        data={"concepts": [{"instanceImages": str(photos), "instancePrompt": "a <disc> disc"}]},
    )
    refused(
        job,
        "spec.data.concepts[0].instanceImages: 1 caption file(s) hold none of the concept's "
        "modifier tokens (<disc>)",
        str(second.with_suffix(".txt")),
        "captionFiles: false",
    )
    assert_no_output(tmp_path)
