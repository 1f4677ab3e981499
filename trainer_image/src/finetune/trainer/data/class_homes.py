"""Where a concept's class images (prior preservation) are kept between runs.

A local folder is used where it is. An S3 prefix is mirrored into a local folder before
the workers start, and each image generated into that folder goes up to the prefix as
soon as it is written: so a job restarted on another machine, a node that did not
generate them, and the next job naming the same prefix find them there instead of
generating them again. Without `classImages.uri` the images are kept in the run's
output (`OUTPUT/class_images/concept-N/`), which may be such a prefix too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.api.common import is_s3
from finetune.trainer.data.concepts import is_image_file
from finetune.trainer.errors import JobInputError
from finetune.trainer.process import stopping
from finetune.trainer.storage.files import cache_key, written_whole
from finetune.trainer.storage.s3 import S3Settings, S3Store

FOLDER = "class_images"  # in a run's output, beside its checkpoints and samples


@dataclass(frozen=True)
class ClassHome:
    """A concept's class images: the local folder the run reads and generates into, and
    the S3 prefix it mirrors (None where the folder is all there is)."""

    folder: Path
    uri: str | None = None


def class_home(
    uri: str | None, index: int, output_uri: str, work_dir: Path, cache: Path
) -> ClassHome:
    """Concept `index`'s class images: at `uri` (its `classImages.uri`), else in the
    output (`work_dir` is the output's local folder)."""
    if uri is None:
        kept = f"{output_uri.rstrip('/')}/{FOLDER}/concept-{index}"
        return ClassHome(work_dir / FOLDER / f"concept-{index}", kept if is_s3(kept) else None)
    if is_s3(uri):
        return ClassHome(cache / "s3-class-images" / cache_key(uri), uri)
    return ClassHome(Path(uri).expanduser())


def fetch(home: ClassHome, settings: S3Settings, field: str) -> int:
    """The images `home`'s prefix holds that its folder lacks (by name and size),
    downloaded; how many. An empty prefix is no error: the run generates them."""
    if home.uri is None:
        return 0
    store = S3Store(home.uri, settings)
    home.folder.mkdir(parents=True, exist_ok=True)
    fetched = 0
    try:
        objects = store.objects()
    except JobInputError as exc:
        raise JobInputError(f"{field}: {exc}") from exc
    for item in objects:
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


def sender(homes: list[ClassHome], settings: S3Settings) -> Callable[[int, Path], None]:
    """Rank 0: what sends a class image just generated into concept N's folder to its
    prefix, if it has one (a failed upload fails the run, as a checkpoint's does)."""
    stores = {i: S3Store(h.uri, settings) for i, h in enumerate(homes) if h.uri is not None}

    def send(index: int, image: Path) -> None:
        if index in stores:
            stores[index].put_file(image, image.name)

    return send
