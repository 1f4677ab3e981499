"""Training images: where they come from, their prompts, and a deterministic order.

Every random choice about data (order, crop, flip) is a pure function of the
job's seed and the position in the run, so a resumed job sees exactly the
batches an uninterrupted one would have seen, with no state to checkpoint.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Example:
    image: Path
    prompt: str


@dataclass(frozen=True)
class Prepared:
    """One training image ready for the VAE, with the prompt to pair it with."""

    pixels: torch.Tensor  # [3, resolution, resolution] in [-1, 1]
    prompt: str
    cacheable: bool  # the same at every position, so its latents may be cached
    mask: torch.Tensor | None = None  # [1, h, w] at latent resolution: where the loss counts
    geometry: ImageGeometry | None = None  # None: as if it had been the training size


class Cropped(NamedTuple):
    pixels: torch.Tensor  # [3, resolution, resolution] in [-1, 1]
    deterministic: bool  # the same at every position
    geometry: ImageGeometry


def image_files(folder: Path, field: str) -> list[Path]:
    if not folder.is_dir():
        raise JobInputError(f"{field}: {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise JobInputError(f"{field}: {folder}: no images (png, jpg, jpeg, webp) in the folder")
    return files


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
    for path in image_files(folder, field):
        if check:
            images.check(path, str(path), rules or ImageRules())
        caption = path.with_suffix(".txt")
        text = (
            caption.read_text(encoding="utf-8").strip()
            if caption_files and caption.exists()
            else ""
        )
        examples.append(Example(path, text or prompt))
    return examples


def split_held_out(examples: list[Example], count: int) -> tuple[list[Example], list[Example]]:
    """(training, held out): a concept's last `count` images by file name are kept out of
    training (`data.concepts[].holdOut`), the real images validation compares samples with.
    By name, so a user chooses them by naming, and every rank and every run agree."""
    if count <= 0:
        return examples, []
    return examples[:-count], examples[-count:]


class ImagePreprocessor:
    """Resize the short side to the resolution, crop a square, maybe flip."""

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

    def deterministic_for(self, size: tuple[int, int]) -> bool:
        """True when the result does not depend on the position (so latents can be cached)."""
        square = size[0] == size[1]
        return not self.random_flip and (self.center_crop or square)

    def __call__(self, source: Path | Image, position: int) -> Cropped:
        """The image (a file, or one `images.decode` returned) as a [-1, 1] tensor,
        whether it is the same at every position, and where it was cropped from."""
        import torch
        from PIL import Image, ImageOps

        image = (
            images.decode(source, str(source), self.rules) if isinstance(source, Path) else source
        )
        width, height = image.size
        deterministic = self.deterministic_for((width, height))
        scale = self.resolution / min(width, height)
        size = (
            max(self.resolution, round(width * scale)),
            max(self.resolution, round(height * scale)),
        )
        image = image.resize(size, Image.Resampling.BILINEAR)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
        spare_x, spare_y = size[0] - self.resolution, size[1] - self.resolution
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
            top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
            image = ImageOps.mirror(image)
            left = spare_x - left  # the crop's corner in the mirrored image
        geometry = ImageGeometry((height, width), (top, left), (self.resolution, self.resolution))
        return Cropped(to_tensor(image), deterministic, geometry)


def to_tensor(image: Image) -> torch.Tensor:
    """A square RGB image as a [3, H, W] tensor in [-1, 1]."""
    import torch

    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


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
        import torch

        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(
                self.seed * 7919 + self.salt * 104_729 + epoch
            )
            self._order = torch.randperm(self.size, generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def positions(self, micro_step: int, rank: int, world: int, batch: int) -> list[int]:
        start = (micro_step * world + rank) * batch
        return list(range(start, start + batch))

    def example_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return self._permutation(epoch)[offset]
