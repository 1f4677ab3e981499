"""Concept images: a deterministic order shared out among ranks, and their prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.trainer.data.concepts import IndexStream
from finetune.trainer.errors import JobInputError


def test_ranks_read_disjoint_examples_and_cover_each_epoch() -> None:
    stream = IndexStream(size=8, seed=3)
    world, batch = 2, 2
    seen = []
    for micro in range(2):  # 2 micro-steps x 2 ranks x 2 images = one epoch of 8
        for rank in range(world):
            seen += [stream.example_at(p) for p in stream.positions(micro, rank, world, batch)]
    assert sorted(seen) == list(range(8))


def test_data_order_is_a_pure_function_of_seed_and_position() -> None:
    first = [IndexStream(5, seed=1).example_at(p) for p in range(20)]
    again = IndexStream(5, seed=1)
    assert [again.example_at(p) for p in reversed(range(20))][::-1] == first
    assert first != [IndexStream(5, seed=2).example_at(p) for p in range(20)]


def test_caption_files_replace_the_concept_prompt(tmp_path: Path) -> None:
    from finetune.assets import write_images
    from finetune.trainer.data.concepts import examples_from

    folder = write_images(tmp_path / "images", 3)
    # Saved by Notepad: a byte-order mark first, which is no part of the prompt.
    (folder / "image-001.txt").write_bytes("\ufeffa photo of sks disc on grass\r\n".encode())
    examples = examples_from(folder, "a photo of sks disc", caption_files=True, field="f")
    assert [e.prompt for e in examples] == [
        "a photo of sks disc",
        "a photo of sks disc on grass",
        "a photo of sks disc",
    ]
    plain = examples_from(folder, "a photo of sks disc", caption_files=False, field="f")
    assert {e.prompt for e in plain} == {"a photo of sks disc"}


def test_a_caption_that_is_not_utf8_is_refused_naming_the_field_and_file(
    tmp_path: Path,
) -> None:
    from finetune.assets import write_images
    from finetune.trainer.data.concepts import examples_from

    folder = write_images(tmp_path / "images", 2)
    caption = folder / "image-001.txt"
    caption.write_bytes("a photo of sks disc in a café".encode("cp1252"))
    field = "spec.data.concepts[0].instanceImages"
    with pytest.raises(JobInputError) as refused:
        examples_from(folder, "a photo of sks disc", caption_files=True, field=field)
    assert str(refused.value) == (
        f"{field}: {caption}: the caption is not UTF-8 text (byte 0xe9 at offset 28); "
        "save it as UTF-8"
    )
    caption.unlink()
    caption.mkdir()  # a folder by a caption's name
    with pytest.raises(JobInputError, match=r"image-001.txt: cannot read the caption \(Is a dir"):
        examples_from(folder, "a photo of sks disc", caption_files=True, field=field)


def test_hidden_files_are_not_training_images(tmp_path: Path) -> None:
    """macOS copies leave `._NAME.png` metadata files beside the images."""
    from finetune.assets import write_images
    from finetune.trainer.data.concepts import examples_from

    folder = write_images(tmp_path / "images", 2)
    (folder / "._image-000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    examples = examples_from(folder, "a photo of sks disc", caption_files=False, field="f")
    assert [e.image.name for e in examples] == ["image-000.png", "image-001.png"]


def test_a_folder_of_iphone_photos_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    from finetune.trainer.data.concepts import examples_from, unread_images

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "._IMG_0001.HEIC"):
        (folder / name).write_bytes(b"ftypheic")
    with pytest.raises(JobInputError) as refused:
        examples_from(folder, "a photo of sks dog", caption_files=True, field="f")
    assert str(refused.value) == (
        f"f: {folder}: no images (png, jpg, jpeg, webp) in the folder; 2 image(s) of another "
        "type (.heic) are not read: convert them to PNG or JPEG"
    )
    assert unread_images(tmp_path) is None


def test_a_caption_named_in_capitals_is_read(tmp_path: Path) -> None:
    """`NAME.TXT`, as some Windows tools write it; `NAME.txt` where a folder holds both."""
    from finetune.assets import write_images
    from finetune.trainer.data.concepts import examples_from

    folder = write_images(tmp_path / "images", 2)
    (folder / "image-000.TXT").write_text("a photo of sks disc on sand")
    (folder / "image-001.TXT").write_text("stale")
    (folder / "image-001.txt").write_text("a photo of sks disc on grass")
    examples = examples_from(folder, "a photo of sks disc", caption_files=True, field="f")
    assert [(e.prompt, e.caption) for e in examples] == [
        ("a photo of sks disc on sand", folder / "image-000.TXT"),
        ("a photo of sks disc on grass", folder / "image-001.txt"),
    ]
