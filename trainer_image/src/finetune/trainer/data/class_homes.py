"""Where a concept's class images (prior preservation) are kept between runs.

A local folder is used where it is. An S3 prefix is mirrored into a local folder before
the workers start, and each image generated into that folder goes up to the prefix as
soon as it is written: so a job restarted on another machine, a node that did not
generate them, and the next job naming the same prefix find them there instead of
generating them again. Without `classImages.uri` the images are kept in the run's
output (`OUTPUT/class_images/concept-N/`), which may be such a prefix too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from finetune.api.common import is_s3
from finetune.api.training import TrainingSpec
from finetune.trainer.data.concepts import is_image_file
from finetune.trainer.errors import JobInputError
from finetune.trainer.process import stopping
from finetune.trainer.storage.files import cache_key, written_whole
from finetune.trainer.storage.inputs import cache_folder_held
from finetune.trainer.storage.s3 import S3Settings, S3Store

FOLDER = "class_images"  # in a run's output, beside its checkpoints and samples
OUTPUT_FIELD = "spec.output.uri"


@dataclass(frozen=True)
class ClassHome:
    """A concept's class images: the local folder the run reads and generates into, the
    S3 prefix it mirrors (None where the folder is all there is), and the spec field
    that names where they are kept, for messages."""

    folder: Path
    uri: str | None
    field: str


def field_of(spec: TrainingSpec, index: int) -> str:
    """The spec field naming where concept `index`'s class images are kept."""
    if spec.data.concepts[index].class_images.uri is None:
        return OUTPUT_FIELD
    return f"spec.data.concepts[{index}].classImages.uri"


def class_home(
    spec: TrainingSpec, index: int, output_uri: str, work_dir: Path, cache: Path
) -> ClassHome:
    """Concept `index`'s class images: at its `classImages.uri`, else in the output
    (`work_dir` being the output's local folder)."""
    uri, field = spec.data.concepts[index].class_images.uri, field_of(spec, index)
    if uri is None:
        kept = f"{output_uri.rstrip('/')}/{FOLDER}/concept-{index}"
        folder = work_dir / FOLDER / f"concept-{index}"
        return ClassHome(folder, kept if is_s3(kept) else None, field)
    if is_s3(uri):
        return ClassHome(cache / "s3-class-images" / cache_key(uri), uri, field)
    return ClassHome(Path(uri).expanduser(), None, field)


def images_in(folder: Path) -> list[Path]:
    """The class images a folder holds, as training reads them (its files beside each
    other, by name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def fetch(home: ClassHome, settings: S3Settings) -> int:
    """The images `home`'s prefix holds that its folder lacks (by name and size),
    downloaded; how many. An empty prefix is no error: the run generates them."""
    if home.uri is None:
        return 0
    home.folder.mkdir(parents=True, exist_ok=True)
    fetched = 0
    with named(home.field), cache_folder_held(home.folder, home.uri):
        store = S3Store(home.uri, settings)
        for item in store.objects():
            target = home.folder / item.key
            if "/" in item.key or not is_image_file(target):
                continue  # only the images beside each other, as the folder is read
            if target.is_file() and target.stat().st_size == item.size:
                continue
            stopping.raise_if_requested()  # between files: a stop leaves whole files only
            with written_whole(target) as partial:
                store.download(item.key, partial)
            fetched += 1
    return fetched


def send_missing(home: ClassHome, settings: S3Settings) -> int:
    """Rank 0: the images `home`'s folder holds that its prefix lacks (by name and size:
    one a killed run made but did not send), uploaded; how many."""
    if home.uri is None:
        return 0
    with named(home.field):
        store = S3Store(home.uri, settings)
        there = {item.key: item.size for item in store.objects()}
        missing = [p for p in images_in(home.folder) if there.get(p.name) != p.stat().st_size]
        for image in missing:
            store.put_file(image, image.name)
    return len(missing)


def sender(homes: list[ClassHome], settings: S3Settings) -> Callable[[int, Path], None]:
    """Rank 0: what sends a class image just generated into concept N's folder to its
    prefix, if it has one (a failed upload fails the run, as a checkpoint's does)."""
    stores = {i: S3Store(h.uri, settings) for i, h in enumerate(homes) if h.uri is not None}

    def send(index: int, image: Path) -> None:
        if index in stores:
            with named(homes[index].field):
                stores[index].put_file(image, image.name)

    return send


@contextmanager
def named(field: str) -> Iterator[None]:
    """S3's refusals (`JobInputError`) named by `field`."""
    try:
        yield
    except JobInputError as exc:
        raise type(exc)(f"{field}: {exc}") from exc
