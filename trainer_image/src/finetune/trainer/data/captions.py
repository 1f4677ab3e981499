"""Image-caption datasets for LCM distillation, read as they are used.

Two layouts, each from a local folder or an S3 prefix:

- `folder`: images with `NAME.txt` captions beside them. The listing is known,
  so the order is a seeded shuffle of the whole set, as for concept images.
- `webdataset`: `.tar` shards whose members are grouped into samples by name
  (`0001.jpg` + `0001.txt`). Shards are streamed member by member; each epoch
  visits them in a seeded order, dealt out to the ranks, through a small seeded
  shuffle buffer.

Nothing is written to disk, and the order depends only on the seed, the rank
and the position, so a resumed run continues the same stream. A sharded one
skips the epochs it finished without opening them (each checkpoint records how
many samples every shard held) and re-reads, without decoding, what it had used
of the current one. S3 reads that break off are resumed where they stopped.
"""

from __future__ import annotations

import logging
import posixpath
import queue
import random
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

from finetune.api.data import CaptionDataset, DatasetFormat
from finetune.trainer.data import images
from finetune.trainer.data.concepts import (
    IMAGE_SUFFIXES,
    IndexStream,
    captions_by_stem,
    is_hidden_key,
    not_utf8,
)
from finetune.trainer.data.images import ImageRules
from finetune.trainer.errors import JobInputError
from finetune.trainer.storage.local import LocalStore
from finetune.trainer.storage.s3 import S3Settings
from finetune.trainer.storage.store import Store, open_store

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

FIELD = "spec.data.dataset.uri"
CAPTION_SUFFIXES = (".txt", ".caption")
SHUFFLE_BUFFER = 64
PREFETCH_SAMPLES = 64


@dataclass(frozen=True)
class CaptionedImage:
    name: str  # where it came from, for messages
    image: bytes
    caption: str

    def decode(self, rules: ImageRules | None = None) -> Image:
        """The image as 8-bit RGB; its size is checked against `rules` as it is read."""
        return images.check(self.image, self.name, rules or ImageRules())


class DatasetFiles:
    """A dataset's files in a store (a local folder or an S3 prefix), by relative key;
    what cannot be found or read locally is named by the spec's field."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.local = isinstance(store, LocalStore)

    @classmethod
    def at(cls, uri: str, settings: S3Settings) -> DatasetFiles:
        return cls(open_store(uri, settings))

    def keys(self) -> list[str]:
        if isinstance(self.store, LocalStore) and not self.store.root.is_dir():
            raise JobInputError(f"{FIELD}: {self.store.root}: no such folder")
        return sorted(dict(self.store.keys()))

    def read(self, key: str) -> bytes:
        with self._reading(key), self.open(key) as stream:
            return stream.read()

    def open(self, key: str) -> IO[bytes]:
        with self._reading(key):
            return self.store.open(key)

    def uri(self, key: str) -> str:
        return self.store.uri_of(key)

    @contextmanager
    def _reading(self, key: str) -> Iterator[None]:
        """A local file that cannot be read is bad input (exit 2); S3 that still fails
        after the retries is an outage, raised as it is (exit 1: a later try may work)."""
        try:
            yield
        except OSError as exc:
            if not self.local:
                raise
            raise JobInputError(f"{FIELD}: {self.uri(key)}: cannot be read ({exc})") from exc


def _suffix(key: str) -> str:
    return posixpath.splitext(key)[1].lower()


@dataclass(frozen=True)
class Layout:
    """What a dataset URI holds: shards, or images paired with their caption files."""

    format: DatasetFormat
    shards: list[str]
    pairs: list[tuple[str, str]]  # (image key, caption key)
    uncaptioned: int = 0

    @property
    def size(self) -> str:
        if self.format == DatasetFormat.WEBDATASET:
            return f"{len(self.shards)} shards"
        return f"{len(self.pairs)} captioned images"


_NAMED_NOT_UTF8: set[str] = set()


def caption_text(data: bytes, name: str) -> str:
    """A caption's text: UTF-8 without a byte-order mark. A caption that is not UTF-8
    trains with U+FFFD for its undecodable bytes rather than failing a run hours in,
    and its file is named in the log (a local folder's are refused before training)."""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        if name not in _NAMED_NOT_UTF8:  # once, not at each epoch's visit
            _NAMED_NOT_UTF8.add(name)
            log.warning("%s: %s (it trains with those bytes replaced)", name, not_utf8(exc))
        return data.decode("utf-8-sig", errors="replace").strip()


def layout_of(files: DatasetFiles, wanted: DatasetFormat | str) -> Layout:
    listed = files.keys()
    keys = [k for k in listed if not is_hidden_key(k)]
    shards = [k for k in keys if _suffix(k) == ".tar"]
    fmt = DatasetFormat(wanted)
    if fmt == DatasetFormat.AUTO:
        fmt = DatasetFormat.WEBDATASET if shards else DatasetFormat.FOLDER
    if fmt == DatasetFormat.WEBDATASET:
        if not shards:
            raise JobInputError(f"{FIELD}: {files.uri('')}: no .tar shards")
        return Layout(fmt, shards, [])
    captions = captions_by_stem(keys, CAPTION_SUFFIXES)
    pairs, uncaptioned = [], 0
    for key in keys:
        if _suffix(key) not in IMAGE_SUFFIXES:
            continue
        caption = captions.get(posixpath.splitext(key)[0])
        if caption is None:
            uncaptioned += 1
        else:
            pairs.append((key, caption))
    if not pairs:
        raise JobInputError(
            f"{FIELD}: {files.uri('')}: no images with a caption file (NAME.png + NAME.txt)"
        )
    return Layout(fmt, [], pairs, uncaptioned)


def check_dataset(dataset: CaptionDataset, settings: S3Settings) -> Layout:
    """What the launcher checks before any worker starts: the dataset is there and
    holds something to train on. Nothing is downloaded."""
    files = DatasetFiles.at(dataset.uri, settings)
    layout = layout_of(files, dataset.format)
    if files.local:
        check_local_captions(files, layout)
    if layout.uncaptioned:
        log.warning(
            "%s: %d images without a caption file are not used", dataset.uri, layout.uncaptioned
        )
    return layout


def check_local_captions(files: DatasetFiles, layout: Layout) -> None:
    """A local folder's caption files are UTF-8 text: reading them is cheap, and one in
    another encoding (a Windows editor's) is named before a step is trained."""
    for _, caption in layout.pairs:
        try:
            files.read(caption).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JobInputError(f"{FIELD}: {files.uri(caption)}: {not_utf8(exc)}") from exc


class CaptionStream(Protocol):
    def take(self, micro_step: int, count: int) -> list[tuple[CaptionedImage, int]]:
        """This rank's `count` samples for `micro_step`, each with its global position."""
        ...

    def state(self) -> dict[str, Any]:
        """What this rank's checkpoint keeps to resume the stream faster."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class IndexedCaptions:
    """Captioned images from a listing: a seeded shuffle per epoch, read ahead in threads."""

    def __init__(
        self, files: DatasetFiles, pairs: list[tuple[str, str]], seed: int, rank: int, world: int
    ) -> None:
        self.files = files
        self.pairs = pairs
        self.stream = IndexStream(len(pairs), seed, salt=2)
        self.rank = rank
        self.world = world
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="captions")
        self.pending: dict[int, list[tuple[Future[CaptionedImage], int]]] = {}

    def _read(self, index: int) -> CaptionedImage:
        image_key, caption_key = self.pairs[index]
        caption = caption_text(self.files.read(caption_key), self.files.uri(caption_key))
        return CaptionedImage(self.files.uri(image_key), self.files.read(image_key), caption)

    def _submit(self, micro_step: int, count: int) -> list[tuple[Future[CaptionedImage], int]]:
        positions = self.stream.positions(micro_step, self.rank, self.world, count)
        return [(self.pool.submit(self._read, self.stream.example_at(p)), p) for p in positions]

    def state(self) -> dict[str, Any]:
        return {}  # positions alone place this stream

    def load_state(self, state: dict[str, Any]) -> None:
        return

    def take(self, micro_step: int, count: int) -> list[tuple[CaptionedImage, int]]:
        current = self.pending.pop(micro_step, None) or self._submit(micro_step, count)
        self.pending = {micro_step + 1: self._submit(micro_step + 1, count)}
        return [(future.result(), position) for future, position in current]


def tar_samples(stream: IO[bytes], name: str) -> Iterator[CaptionedImage]:
    """The image-caption samples of one webdataset shard, read front to back."""
    key: str | None = None
    parts: dict[str, bytes] = {}

    def finished() -> CaptionedImage | None:
        image = next((parts[e] for e in parts if "." + e in IMAGE_SUFFIXES), None)
        caption = next((parts[e] for e in ("txt", "caption") if e in parts), None)
        if key is None or image is None or caption is None:
            return None
        return CaptionedImage(f"{name}:{key}", image, caption_text(caption, f"{name}:{key}"))

    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                stem, dot, extension = base.partition(".")
                if not dot:
                    continue
                sample_key = posixpath.join(folder, stem)
                if sample_key != key:
                    if (sample := finished()) is not None:
                        yield sample
                    key, parts = sample_key, {}
                handle = tar.extractfile(member)
                if handle is not None:
                    parts[extension.lower()] = handle.read()
        if (sample := finished()) is not None:
            yield sample
    except tarfile.TarError as exc:
        raise JobInputError(f"{name}: not a readable tar shard ({exc})") from exc


class ShardedCaptions:
    """A rank's endless stream of samples from webdataset shards, produced by a
    background thread so reading overlaps training."""

    def __init__(
        self, files: DatasetFiles, shards: list[str], seed: int, rank: int, world: int
    ) -> None:
        self.files = files
        self.shards = shards
        self.seed = seed
        self.rank = rank
        self.world = world
        self.queue: queue.Queue[tuple[CaptionedImage, int] | BaseException] | None = None
        self.next_step = -1
        # Samples per shard, learnt as shards are read and kept in checkpoints, so a
        # resumed run can skip finished epochs without reading them again.
        self.sizes: dict[str, int] = {}

    def _my_shards(self, epoch: int) -> tuple[list[str], bool]:
        """This rank's shards for `epoch`, and whether it must share them sample by sample
        (when there are fewer shards than ranks). The epochs' shard orders are dealt out
        as one continuous sequence, so every epoch's shards go to the ranks exactly once
        even when their number is not a multiple of the ranks."""
        import torch

        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=generator)]
        count = len(order)
        if count >= self.world:
            return [
                s for i, s in enumerate(order) if (epoch * count + i) % self.world == self.rank
            ], False
        return order, True

    def _epoch_length(self, epoch: int) -> int | None:
        """How many samples this rank reads in `epoch`, if every shard's size is known."""
        shards, shared = self._my_shards(epoch)
        if any(s not in self.sizes for s in shards):
            return None
        if shared:  # samples rank, rank + world, ... of each shard
            return sum(max(0, -(-(self.sizes[s] - self.rank) // self.world)) for s in shards)
        return sum(self.sizes[s] for s in shards)

    def state(self) -> dict[str, Any]:
        return {"shardSizes": dict(self.sizes)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sizes.update(state.get("shardSizes", {}))

    def samples(self, epoch: int = 0) -> Iterator[CaptionedImage]:
        """Every sample this rank reads from `epoch` on, in its seeded order."""
        while True:
            shards, shared = self._my_shards(epoch)
            shuffle = random.Random(f"{self.seed}/{epoch}/{self.rank}")
            buffer: list[CaptionedImage] = []
            seen = 0
            for shard in shards:
                index = -1
                with self.files.open(shard) as stream:
                    for index, sample in enumerate(tar_samples(stream, self.files.uri(shard))):
                        if shared and index % self.world != self.rank:
                            continue
                        seen += 1
                        buffer.append(sample)
                        if len(buffer) >= SHUFFLE_BUFFER:
                            yield buffer.pop(shuffle.randrange(len(buffer)))
                self.sizes[shard] = index + 1
            if seen == 0:
                raise JobInputError(
                    f"{FIELD}: no image-caption samples (NAME.jpg + NAME.txt) in this rank's shards: "
                    + ", ".join(self.files.uri(s) for s in shards)
                )
            shuffle.shuffle(buffer)
            yield from buffer
            epoch += 1

    def _produce(self, skip: int, out: queue.Queue[Any]) -> None:
        try:
            epoch, first = 0, 0  # `first`: this rank's count of samples before `epoch`
            while (length := self._epoch_length(epoch)) is not None and first + length <= skip:
                epoch, first = epoch + 1, first + length
            for count, sample in enumerate(self.samples(epoch), start=first):
                if count >= skip:
                    out.put((sample, count * self.world + self.rank))
        except BaseException as exc:  # handed to the training thread, which raises it
            out.put(exc)

    def take(self, micro_step: int, count: int) -> list[tuple[CaptionedImage, int]]:
        if self.queue is None or micro_step != self.next_step:
            # First batch, or a jump (resume): start reading where this step begins.
            self.queue = queue.Queue(maxsize=max(PREFETCH_SAMPLES, 2 * count))
            threading.Thread(
                target=self._produce, args=(micro_step * count, self.queue), daemon=True
            ).start()
        self.next_step = micro_step + 1
        taken = []
        for _ in range(count):
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            taken.append(item)
        return taken


def open_stream(
    dataset: CaptionDataset, settings: S3Settings, seed: int, rank: int, world: int
) -> CaptionStream:
    files = DatasetFiles.at(dataset.uri, settings)
    layout = layout_of(files, dataset.format)
    if layout.format == DatasetFormat.WEBDATASET:
        return ShardedCaptions(files, layout.shards, seed, rank, world)
    return IndexedCaptions(files, layout.pairs, seed, rank, world)
