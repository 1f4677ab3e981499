"""Training images: where they come from, their prompts, and a deterministic order.

Every random choice about data (order, crop, flip) is a pure function of the
job's seed and the position in the run, so a resumed job sees exactly the
batches an uninterrupted one would have seen, with no state to checkpoint.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from finetune.trainer.data import images
from finetune.trainer.data.geometry import ImageGeometry
from finetune.trainer.data.images import ImageRules
from finetune.trainer.errors import JobInputError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
# Photos a folder may hold that are not read (an iPhone's HEIC, say): named, not ignored.
UNREAD_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jfif", ".gif", ".bmp", ".tif", ".tiff"})


def is_image_file(path: Path) -> bool:
    """An image by its name. Hidden files are not: macOS leaves `._NAME.jpg` metadata
    beside each image it copies, and those are no images."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def is_hidden_key(key: str) -> bool:
    """A dataset file under a hidden name or folder: `._NAME.jpg` metadata, or the
    `__MACOSX/` folder a zip made on macOS unpacks with. Neither holds data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in key.split("/"))


@dataclass(frozen=True)
class Example:
    image: Path
    prompt: str
    caption: Path | None = None  # the caption file its prompt came from, if one
    # (width, height) to train it at: its aspect-ratio bucket; None: the square resolution.
    size: tuple[int, int] | None = None


@dataclass(frozen=True)
class Prepared:
    """One training image ready for the VAE, with the prompt to pair it with."""

    pixels: torch.Tensor  # [3, height, width] in [-1, 1]: the square resolution or a bucket
    prompt: str
    cacheable: bool  # the same at every position, so its latents may be cached
    mask: torch.Tensor | None = None  # [1, h, w] at latent resolution: where the loss counts
    geometry: ImageGeometry | None = None  # None: as if it had been the training size


class Cropped(NamedTuple):
    pixels: torch.Tensor  # [3, height, width] in [-1, 1]
    deterministic: bool  # the same at every position
    geometry: ImageGeometry


def image_files(folder: Path, field: str) -> list[Path]:
    if not folder.is_dir():
        raise JobInputError(f"{field}: {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        unread = unread_images(folder)
        raise JobInputError(
            f"{field}: {folder}: no images (png, jpg, jpeg, webp) in the folder"
            + (f"; {unread}" if unread else "")
        )
    return files


def unread_images(folder: Path) -> str | None:
    """What says that `folder` holds photos of a type training does not read (HEIC...),
    and what to do; None where it holds none."""
    unread = [
        p for p in folder.iterdir() if p.suffix.lower() in UNREAD_SUFFIXES and p.name[0] != "."
    ]
    if not unread:
        return None
    kinds = ", ".join(sorted({p.suffix.lower() for p in unread}))
    return f"{len(unread)} image(s) of another type ({kinds}) are not read: convert them to PNG or JPEG"


def examples_from(
    folder: Path,
    prompt: str,
    caption_files: bool,
    field: str,
    check: bool = True,
    rules: ImageRules | None = None,
) -> list[Example]:
    """Every image of `folder` with its prompt: `NAME.txt` when present and allowed.
    `check` decodes each image first and checks it against `rules` (off where the
    launcher has checked them)."""
    examples = []
    files = image_files(folder, field)  # first: it names a missing folder
    captions = captions_in(folder) if caption_files else {}
    for path in files:
        if check:
            images.check(path, f"{field}: {path}", rules or ImageRules())
        caption = captions.get(path.stem)
        text = read_caption(caption, field) if caption is not None else ""
        examples.append(Example(path, text or prompt, caption if text else None))
    return examples


def captions_in(folder: Path) -> dict[str, Path]:
    """The caption files of `folder` by stem: `NAME.txt`, or `NAME.TXT` as some Windows
    tools write it (the lower-case name where a folder holds both)."""
    names = sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
    return {stem: folder / name for stem, name in captions_by_stem(names, (".txt",)).items()}


def captions_by_stem(keys: list[str], suffixes: tuple[str, ...]) -> dict[str, str]:
    """Each caption file of `keys` (names, or `/`-separated keys) by its stem: the first
    of `suffixes` that is there, each in any case (`NAME.TXT`, as some Windows tools
    write it), the lower-case name first."""
    ranked: dict[str, tuple[tuple[int, bool], str]] = {}
    for key in keys:
        stem, suffix = posixpath.splitext(key)
        if suffix.lower() not in suffixes:
            continue
        rank = (suffixes.index(suffix.lower()), suffix != suffix.lower())
        if stem not in ranked or rank < ranked[stem][0]:
            ranked[stem] = (rank, key)
    return {stem: key for stem, (_, key) in ranked.items()}


def not_utf8(exc: UnicodeDecodeError) -> str:
    """What is wrong with a caption `exc` failed to decode, and what to do."""
    return (
        f"the caption is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
        f"{exc.start}); save it as UTF-8"
    )


def read_caption(path: Path, field: str) -> str:
    """An image's caption file, as UTF-8 text; refusals name the field and the file."""
    try:
        # utf-8-sig: a byte-order mark (Notepad's) is no part of the prompt.
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise JobInputError(f"{field}: {path}: {not_utf8(exc)}") from exc
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise JobInputError(f"{field}: {path}: cannot read the caption ({reason})") from exc


def split_held_out(examples: list[Example], count: int) -> tuple[list[Example], list[Example]]:
    """(training, held out): a concept's last `count` images by file name are kept out of
    training (`data.concepts[].holdOut`), the real images validation compares samples with.
    By name, so a user chooses them by naming, and every rank and every run agree."""
    if count <= 0:
        return examples, []
    return examples[:-count], examples[-count:]


class ImagePreprocessor:
    """Resize the image to cover the target (a square of the resolution, or a bucket's
    size), crop it to the target, maybe flip."""

    def __init__(
        self,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        seed: int,
        rules: ImageRules | None = None,
    ) -> None:
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.rules = rules or ImageRules()

    def deterministic_for(
        self, size: tuple[int, int], target: tuple[int, int] | None = None
    ) -> bool:
        """True when the result does not depend on the position (so latents can be cached):
        no flip, and a centre crop or an image of the target's aspect ratio exactly."""
        width, height = target or (self.resolution, self.resolution)
        same_shape = size[0] * height == size[1] * width
        return not self.random_flip and (self.center_crop or same_shape)

    def __call__(
        self, source: Path | Image, position: int, target: tuple[int, int] | None = None
    ) -> Cropped:
        """The image (a file, or one `images.decode` returned) at `target` (width, height;
        default the square resolution) as a [-1, 1] tensor, whether it is the same at
        every position, and where it was cropped from."""
        import torch
        from PIL import Image, ImageOps

        image = (
            images.decode(source, str(source), self.rules) if isinstance(source, Path) else source
        )
        target_width, target_height = target or (self.resolution, self.resolution)
        width, height = image.size
        deterministic = self.deterministic_for((width, height), (target_width, target_height))
        scale = max(target_width / width, target_height / height)
        size = (
            max(target_width, round(width * scale)),
            max(target_height, round(height * scale)),
        )
        image = image.resize(size, Image.Resampling.BILINEAR)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
        spare_x, spare_y = size[0] - target_width, size[1] - target_height
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
            top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
        image = image.crop((left, top, left + target_width, top + target_height))
        if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
            image = ImageOps.mirror(image)
            left = spare_x - left  # the crop's corner in the mirrored image
        geometry = ImageGeometry((height, width), (top, left), (target_height, target_width))
        return Cropped(to_tensor(image), deterministic, geometry)


def to_tensor(image: Image) -> torch.Tensor:
    """An RGB image as a [3, H, W] tensor in [-1, 1]."""
    import torch

    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def seeded_permutation(size: int, seed: int, salt: int, epoch: int) -> list[int]:
    """A permutation of range(size), the same for the same (seed, salt, epoch)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 7919 + salt * 104_729 + epoch)
    return torch.randperm(size, generator=generator).tolist()


class IndexStream:
    """Which examples each rank reads at each micro-step: epochs of seeded permutations,
    the global stream dealt out to ranks in turn. Pure, so resume needs no state."""

    def __init__(self, size: int, seed: int, salt: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.salt = salt
        self._epoch = -1
        self._order: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = seeded_permutation(self.size, self.seed, self.salt, epoch)
            self._epoch = epoch
        return self._order

    def positions(self, micro_step: int, rank: int, world: int, batch: int) -> list[int]:
        start = (micro_step * world + rank) * batch
        return list(range(start, start + batch))

    def example_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return self._permutation(epoch)[offset]

    def take(self, micro_step: int, rank: int, world: int, batch: int) -> list[tuple[int, int]]:
        """(position in the run, example index) of each sample `rank` reads at `micro_step`."""
        return [(p, self.example_at(p)) for p in self.positions(micro_step, rank, world, batch)]
