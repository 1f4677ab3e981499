"""Training images of every mode Pillow writes become the right 8-bit RGB picture,
transparency follows `data.alpha`, and small images are warned about or refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from finetune.trainer.data import images
from finetune.trainer.data.captions import CaptionedImage
from finetune.trainer.data.concepts import ImagePreprocessor, examples_from
from finetune.trainer.data.images import ImageRules, check, check_size, decode
from finetune.trainer.errors import JobInputError

WHITE = ImageRules(alpha="white")
BLACK = ImageRules(alpha="black")
REFUSE = ImageRules(alpha="refuse")


def saved(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, **options)
    return path


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    return [image.getpixel((x, 0)) for x in range(image.width)]  # type: ignore[misc]


def test_a_16_bit_grayscale_png_keeps_its_gradient(tmp_path: Path) -> None:
    gradient = Image.new("I;16", (256, 2))
    gradient.putdata([x * 257 for x in range(256)] * 2)
    path = saved(gradient, tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"  # what made the old loader clip to white

    rgb = decode(path, str(path), WHITE)
    assert rgb.mode == "RGB"
    assert pixels(rgb) == [(v, v, v) for v in range(256)]


def test_a_16_bit_grayscale_colour_key_is_transparency(tmp_path: Path) -> None:
    gradient = Image.new("I;16", (3, 1))
    gradient.putdata([0, 32896, 65535])
    path = saved(gradient, tmp_path / "keyed.png", transparency=0)
    assert Image.open(path).info["transparency"] == 0

    assert pixels(decode(path, str(path), WHITE)) == [(255,) * 3, (128,) * 3, (255,) * 3]
    assert pixels(decode(path, str(path), BLACK)) == [(0,) * 3, (128,) * 3, (255,) * 3]
    with pytest.raises(JobInputError, match="has transparent pixels"):
        decode(path, str(path), REFUSE)


def test_32_bit_integer_and_float_grayscale_are_scaled(tmp_path: Path) -> None:
    deep = Image.new("I", (3, 1))
    deep.putdata([0, 32896, 65535])  # 16-bit data, as older Pillow reads such PNGs
    path = saved(deep, tmp_path / "deep.tiff")
    assert pixels(decode(path, str(path), WHITE)) == [(0, 0, 0), (128, 128, 128), (255,) * 3]

    unit = Image.new("F", (3, 1))
    unit.putdata([0.0, 0.5, 1.0])  # 0-1 floats
    path = saved(unit, tmp_path / "unit.tiff")
    assert pixels(decode(path, str(path), WHITE)) == [(0, 0, 0), (128, 128, 128), (255,) * 3]

    wide = Image.new("F", (3, 1))
    wide.putdata([0.0, 100.0, 255.0])  # 0-255 floats
    path = saved(wide, tmp_path / "wide.tiff")
    assert pixels(decode(path, str(path), WHITE)) == [(0, 0, 0), (100, 100, 100), (255,) * 3]


def half_transparent(mode: str) -> Image.Image:
    """Two pixels: opaque red (or grey), then the same colour at alpha 128."""
    image = Image.new("RGBA", (2, 1))
    image.putdata([(200, 0, 0, 255), (200, 0, 0, 128)])
    return image if mode == "RGBA" else image.convert(mode)


@pytest.mark.parametrize(
    ("rules", "expected"),
    [(WHITE, (228, 127, 127)), (BLACK, (100, 0, 0))],
    ids=["white", "black"],
)
def test_rgba_is_composited_on_the_chosen_background(
    tmp_path: Path, rules: ImageRules, expected: tuple[int, int, int]
) -> None:
    path = saved(half_transparent("RGBA"), tmp_path / "logo.png")
    first, second = pixels(decode(path, str(path), rules))
    assert first == (200, 0, 0)
    assert all(abs(a - b) <= 1 for a, b in zip(second, expected, strict=True)), second


def test_gray_alpha_and_palette_transparency_are_composited(tmp_path: Path) -> None:
    la = saved(half_transparent("LA"), tmp_path / "la.png")
    grey = Image.open(la).getpixel((0, 0))[0]  # type: ignore[index]
    first, second = pixels(decode(la, str(la), BLACK))
    assert first == (grey,) * 3
    assert abs(second[0] - grey / 2) <= 1

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255, 0, 255, 0])
    palette.putdata([0, 1])
    path = saved(palette, tmp_path / "palette.png", transparency=1)
    assert pixels(decode(path, str(path), WHITE)) == [(0, 0, 255), (255, 255, 255)]
    assert pixels(decode(path, str(path), BLACK)) == [(0, 0, 255), (0, 0, 0)]

    keyed = Image.new("RGB", (2, 1))
    keyed.putdata([(1, 2, 3), (9, 9, 9)])
    path = saved(keyed, tmp_path / "keyed.png", transparency=(1, 2, 3))
    assert pixels(decode(path, str(path), WHITE)) == [(255, 255, 255), (9, 9, 9)]


def test_refuse_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = saved(half_transparent("RGBA"), tmp_path / "logo.png")
    with pytest.raises(JobInputError) as error:
        decode(path, str(path), REFUSE)
    assert str(path) in str(error.value)
    assert "spec.data.alpha" in str(error.value)
    assert "transparent" in str(error.value)


def test_an_opaque_rgba_image_passes_even_when_transparency_is_refused(tmp_path: Path) -> None:
    path = saved(Image.new("RGBA", (2, 2), (10, 20, 30, 255)), tmp_path / "opaque.png")
    assert pixels(decode(path, str(path), REFUSE)) == [(10, 20, 30)] * 2


def test_one_bit_cmyk_and_grayscale_files(tmp_path: Path) -> None:
    bits = Image.new("1", (2, 1))
    bits.putdata([0, 1])
    path = saved(bits, tmp_path / "bits.png")
    assert pixels(decode(path, str(path), WHITE)) == [(0, 0, 0), (255, 255, 255)]

    path = saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "red.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    red = decode(path, str(path), WHITE).getpixel((4, 4))
    assert red[0] > 240, red  # type: ignore[index]
    assert max(red[1:]) < 15, red  # type: ignore[index]

    path = saved(Image.new("L", (2, 2), 77), tmp_path / "grey.png")
    assert pixels(decode(path, str(path), WHITE)) == [(77, 77, 77)] * 2


def test_the_exif_orientation_is_applied(tmp_path: Path) -> None:
    wide = Image.new("RGB", (4, 2), (0, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = saved(wide, tmp_path / "phone.jpg", exif=exif.tobytes())
    assert decode(path, str(path), WHITE).size == (2, 4)


def test_small_images_are_warned_about_once_or_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = saved(Image.new("RGB", (20, 40)), tmp_path / "tiny.png")
    warn = ImageRules(warn_below=32)
    with caplog.at_level(logging.WARNING, logger=images.__name__):
        check(path, str(path), warn)
        check(path, str(path), warn)
    (record,) = caplog.records
    assert str(path) in record.getMessage()
    assert "20x40" in record.getMessage()

    with pytest.raises(JobInputError) as error:
        check(path, str(path), ImageRules(min_size=32, warn_below=32))
    message = str(error.value)
    assert str(path) in message
    assert "spec.data.minImageSize" in message
    assert "20x40" in message
    check_size((32, 50), "big-enough.png", ImageRules(min_size=32, warn_below=64))  # no error


def test_rules_follow_the_job(tmp_path: Path) -> None:
    from finetune.api.data import DataSpec

    data = DataSpec.model_validate({"resolution": 512, "alpha": "refuse", "minImageSize": 64})
    assert ImageRules.of(data) == ImageRules(alpha="refuse", min_size=64, warn_below=256)
    assert ImageRules.of(DataSpec()) == ImageRules(alpha="white", min_size=None, warn_below=256)


def test_every_path_decodes_the_same_way(tmp_path: Path) -> None:
    """Concept folders (checked by the launcher, read by the preprocessor) and caption
    datasets go through the one decoder."""
    folder = tmp_path / "concept"
    folder.mkdir()
    gradient = Image.new("I;16", (64, 64))
    gradient.putdata([(x % 64) * 1040 for x in range(64 * 64)])
    path = saved(gradient, folder / "deep.png")
    saved(half_transparent("RGBA").resize((64, 64), Image.Resampling.NEAREST), folder / "logo.png")

    with pytest.raises(JobInputError, match=r"logo\.png.*spec\.data\.alpha"):
        examples_from(folder, "a photo", False, "f", rules=REFUSE)
    (deep, _) = examples_from(folder, "a photo", False, "f", rules=WHITE)

    tensor, _, _ = ImagePreprocessor(64, True, False, seed=0, rules=WHITE)(deep.image, 0)
    assert (tensor.min(), tensor.max()) == (-1.0, 1.0)
    assert tensor[0, 0].unique().numel() == 64  # a gradient, not a white square

    sample = CaptionedImage("shard.tar:logo", (folder / "logo.png").read_bytes(), "a logo")
    assert pixels(sample.decode(BLACK))[0] == (200, 0, 0)
    with pytest.raises(JobInputError, match=r"shard\.tar:logo.*spec\.data\.alpha"):
        sample.decode(REFUSE)
    assert decode(path, str(path), WHITE).getpixel((32, 0)) == (129, 129, 129)


def test_a_stream_of_small_images_is_named_a_limited_number_of_times(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(images, "_warned", set())
    rules = ImageRules(warn_below=256)
    with caplog.at_level(logging.WARNING, logger=images.__name__):
        for index in range(images.MAX_SIZE_WARNINGS + 5):
            check_size((64, 64), f"shard.tar:{index}", rules)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == images.MAX_SIZE_WARNINGS + 1
    assert messages[-1].endswith("further ones are not reported")
