"""Image decoding: every training image, whatever mode it was saved in, becomes the
same 8-bit RGB picture, by one function that concept folders, class images and
caption datasets all go through.

- 16-bit grayscale (`I;16*`, and `I` as older Pillow reads such PNGs) is scaled
  from 0-65535 to 0-255, never clipped (clipping turns a photo white).
- Floating-point grayscale (`F`) is read as 0-1 when every value lies there,
  otherwise as 0-255.
- Transparency (`RGBA`, `LA`, palette or single-colour transparency) is composited
  on the background `data.alpha` names (`white` or `black`), or refused (`refuse`).
  Images whose pixels are all opaque pass whatever the setting.
- Everything else (1-bit, grayscale, palette, CMYK, YCbCr...) is Pillow's conversion.
- The EXIF orientation is applied first, as a camera viewer would.

Sizes: an image whose short side is below `data.minImageSize` is refused; without
that setting, one below half the training resolution is used with a warning (it
is upscaled at least twofold, so it trains blur).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from finetune.trainer.errors import JobInputError

if TYPE_CHECKING:
    from PIL.Image import Image

    from finetune.api.data import DataSpec

log = logging.getLogger(__name__)

ALPHA_FIELD = "spec.data.alpha"
MIN_SIZE_FIELD = "spec.data.minImageSize"
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

MAX_SIZE_WARNINGS = 20  # small files named in one process before falling silent

_warned: set[str] = set()  # files already warned about in this process


@dataclass(frozen=True)
class ImageRules:
    """What a job accepts: how transparency is handled and which sizes pass."""

    alpha: str = "white"  # white | black | refuse
    min_size: int | None = None  # refuse a short side below this
    warn_below: int = 0  # without min_size: warn about a short side below this

    @classmethod
    def of(cls, data: DataSpec) -> ImageRules:
        return cls(str(data.alpha), data.min_image_size, data.resolution // 2)


def open_image(source: Path | bytes, name: str) -> Image:
    """The fully decoded file (`verify` alone misses truncated JPEGs)."""
    from PIL import Image

    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as opened:
            opened.load()
            return opened.copy()
    except Exception as exc:  # PIL raises OSError, SyntaxError, DecompressionBombError...
        raise JobInputError(f"{name}: not a readable image ({exc})") from exc


def to_rgb(image: Image, name: str, alpha: str = "white") -> Image:
    """`image` as 8-bit RGB, by the rules in this module's docstring."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        wide = image if mode == "I" else image.convert("I")
        # + 0.5: `point` truncates, so this rounds to the nearest 8-bit value.
        grey = wide.point(lambda v: v / 257 + 0.5).convert("L")
        key = image.info.get("transparency")
        if not isinstance(key, int):
            return grey.convert("RGB")
        return _flatten(_keyed(grey, wide, key), name, alpha)
    if mode == "F":
        low, high = cast("tuple[float, float]", image.getextrema())
        scale = 255.0 if low >= 0.0 and high <= 1.0 else 1.0
        return image.point(lambda v: v * scale + 0.5).convert("L").convert("RGB")
    if mode == "P" or (mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ALPHA_MODES:
        # Premultiplied La converts to RGBA only by way of LA.
        straight = image.convert("LA") if image.mode == "La" else image
        return _flatten(straight.convert("RGBA"), name, alpha)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise JobInputError(f"{name}: image mode {mode} cannot be converted to RGB") from exc


def _keyed(grey: Image, wide: Image, key: int) -> Image:
    """`grey` with the pixels whose 16-bit value in `wide` is the colour `key` transparent."""
    import numpy as np
    from PIL import Image

    rgba = grey.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.asarray(wide) == key, 0, 255).astype(np.uint8)))
    return rgba


def _flatten(rgba: Image, name: str, alpha: str) -> Image:
    from PIL import Image

    mask = rgba.getchannel("A")
    lowest = mask.getextrema()[0]
    if isinstance(lowest, (int, float)) and lowest >= 255:  # opaque: nothing to decide
        return rgba.convert("RGB")
    if alpha not in BACKGROUNDS:
        raise JobInputError(
            f"{name}: has transparent pixels and {ALPHA_FIELD} is {alpha!r}; flatten the "
            f"image, or set {ALPHA_FIELD} to white or black to composite it on that colour"
        )
    flat = Image.new("RGB", rgba.size, BACKGROUNDS[alpha])
    flat.paste(rgba.convert("RGB"), mask=mask)
    return flat


def decode(source: Path | bytes | Image, name: str, rules: ImageRules) -> Image:
    """An upright 8-bit RGB image from a file, its bytes, or an opened image."""
    from PIL import Image, ImageOps

    image = source if isinstance(source, Image.Image) else open_image(source, name)
    return to_rgb(ImageOps.exif_transpose(image), name, rules.alpha)


# EXIF orientations that turn the picture a quarter turn (width and height swap).
QUARTER_TURNS = frozenset({5, 6, 7, 8})
ORIENTATION_TAG = 0x0112


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of the file as `decode` will show it, read from its header alone."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            width, height = opened.size
            turned = opened.getexif().get(ORIENTATION_TAG) in QUARTER_TURNS
    except Exception as exc:  # as in `open_image`
        raise JobInputError(f"{path}: not a readable image ({exc})") from exc
    return (height, width) if turned else (width, height)


def check_size(size: tuple[int, int], name: str, rules: ImageRules) -> None:
    """Refuse a too small image when `minImageSize` is set; warn once otherwise."""
    short = min(size)
    if rules.min_size is not None:
        if short < rules.min_size:
            raise JobInputError(
                f"{name}: {size[0]}x{size[1]} is smaller than {MIN_SIZE_FIELD} "
                f"({rules.min_size} px on the short side)"
            )
        return
    if short >= rules.warn_below or name in _warned or len(_warned) >= MAX_SIZE_WARNINGS:
        return
    _warned.add(name)
    log.warning(
        "%s: %dx%d is below half the training resolution; it is upscaled and trains "
        "blur (set %s to refuse such images)",
        name,
        size[0],
        size[1],
        MIN_SIZE_FIELD,
    )
    if len(_warned) == MAX_SIZE_WARNINGS:
        log.warning("%d small images so far; further ones are not reported", len(_warned))


def check(source: Path | bytes, name: str, rules: ImageRules) -> Image:
    """Decode `source` as training will, and check its size: what the launcher runs on
    every instance image before any worker starts."""
    image = decode(source, name, rules)
    check_size(image.size, name, rules)
    return image
