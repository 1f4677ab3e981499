"""Image-caption datasets for LCM: layouts, webdataset shards, and a stream that
depends only on the seed, the rank and the position (so resume continues it)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import IO

import pytest

from finetune.api.data import CaptionDataset, DatasetFormat
from finetune.trainer.data.captions import (
    DatasetFiles,
    IndexedCaptions,
    ShardedCaptions,
    check_dataset,
    layout_of,
    tar_samples,
)
from finetune.trainer.errors import JobInputError
from finetune.trainer.storage.local import LocalStore
from finetune.trainer.storage.s3 import S3Settings


def png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def shards(folder: Path, count: int, per_shard: int) -> Path:
    for shard in range(count):
        members = []
        for index in range(per_shard):
            key = f"s{shard}-{index:03d}"
            members += [(f"{key}.png", png(index)), (f"{key}.txt", key.encode())]
        write_shard(folder / f"shard-{shard:03d}.tar", members)
    return folder


def local(folder: Path) -> DatasetFiles:
    return DatasetFiles(LocalStore(folder))


def captions(taken: list[tuple[object, int]]) -> list[str]:
    return [sample.caption for sample, _ in taken]  # type: ignore[attr-defined]


def test_tar_members_group_into_samples_by_name(tmp_path: Path) -> None:
    shard = write_shard(
        tmp_path / "a.tar",
        [
            ("one.jpg", png(1)),
            ("one.txt", b" a red disc \n"),
            ("sub/two.png", png(2)),
            ("sub/two.caption", b"a blue disc"),
            ("sub/two.json", b"{}"),
            ("three.png", png(3)),  # no caption: not a sample
            ("four.txt", b"no image"),  # no image: not a sample
        ],
    )
    with shard.open("rb") as stream:
        samples = list(tar_samples(stream, str(shard)))
    assert [(s.name, s.caption) for s in samples] == [
        (f"{shard}:one", "a red disc"),
        (f"{shard}:sub/two", "a blue disc"),
    ]
    assert samples[1].decode().size == (8, 8)


def test_a_broken_shard_or_image_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all" * 64)
    with (
        broken.open("rb") as stream,
        pytest.raises(JobInputError, match=r"broken\.tar: not a readable tar"),
    ):
        list(tar_samples(stream, str(broken)))
    shard = write_shard(tmp_path / "bad.tar", [("x.png", b"garbage"), ("x.txt", b"caption")])
    with shard.open("rb") as stream:
        (sample,) = tar_samples(stream, str(shard))
    with pytest.raises(JobInputError, match=r"bad.tar:x: not a readable image"):
        sample.decode()


def test_the_layout_is_detected_and_bad_datasets_named(tmp_path: Path) -> None:
    shards(tmp_path / "wds", 2, 2)
    assert layout_of(local(tmp_path / "wds"), "auto").format == DatasetFormat.WEBDATASET

    folder = tmp_path / "folder"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_bytes(png(index))
    (folder / "0.txt").write_text("a red disc")
    (folder / "1.caption").write_text("a green disc")
    dataset = CaptionDataset(uri=str(folder))
    layout = check_dataset(dataset, S3Settings())
    assert layout.format == DatasetFormat.FOLDER
    assert layout.pairs == [("0.png", "0.txt"), ("1.png", "1.caption")]
    assert layout.uncaptioned == 1

    with pytest.raises(JobInputError, match=r"spec.data.dataset.uri: .*folder: no .tar shards"):
        layout_of(local(folder), "webdataset")
    (folder / "0.txt").unlink()
    (folder / "1.caption").unlink()
    with pytest.raises(
        JobInputError, match=r"spec\.data\.dataset\.uri: .*no images with a caption"
    ):
        layout_of(local(folder), "auto")
    with pytest.raises(JobInputError, match=r"spec\.data\.dataset\.uri: .*missing: no such folder"):
        layout_of(local(tmp_path / "missing"), "auto")


@pytest.mark.parametrize("shard_count", [4, 1])
def test_sharded_stream_deals_disjoint_samples_to_ranks_and_resumes_exactly(
    tmp_path: Path, shard_count: int
) -> None:
    folder = shards(tmp_path, shard_count, 96 // shard_count)
    files = local(folder)
    names = sorted(p.name for p in folder.iterdir())

    def stream(rank: int) -> ShardedCaptions:
        return ShardedCaptions(files, names, seed=5, rank=rank, world=2)

    ranks = [stream(0), stream(1)]
    epoch = [captions(r.take(step, 8)) for r in ranks for step in range(6)]
    flat = [c for batch in epoch for c in batch]
    assert len(flat) == len(set(flat)) == 96, "one epoch: every sample once, on one rank"

    # A restarted rank 1 picking up in the middle of an epoch (samples still in the
    # shuffle buffer) sees exactly what it would have seen.
    continued = [captions(ranks[1].take(step, 8)) for step in range(6, 10)]
    restarted = stream(1)
    assert [captions(restarted.take(step, 8)) for step in range(8, 10)] == continued[2:]
    positions = [p for _, p in stream(1).take(0, 8)]
    assert positions == [i * 2 + 1 for i in range(8)]


class CountingFiles(DatasetFiles):
    """A local folder that counts which shards are opened."""

    def __init__(self, root: Path) -> None:
        super().__init__(LocalStore(root))
        self.opened: list[str] = []

    def open(self, key: str) -> IO[bytes]:
        self.opened.append(key)
        return super().open(key)


def test_with_the_checkpointed_shard_sizes_a_resume_skips_finished_epochs_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("finetune.trainer.data.captions.PREFETCH_SAMPLES", 1)  # read ahead little
    folder = shards(tmp_path, 3, 5)  # 15 samples: 7 or 8 per rank and epoch
    names = sorted(p.name for p in folder.iterdir())
    first = ShardedCaptions(local(folder), names, seed=1, rank=0, world=2)
    expected = [captions(first.take(step, 4)) for step in range(12)]
    state = first.state()
    assert state == {"shardSizes": dict.fromkeys(names, 5)}

    def resume(state: dict[str, object]) -> int:
        files = CountingFiles(folder)
        resumed = ShardedCaptions(files, names, seed=1, rank=0, world=2)
        resumed.load_state(state)
        assert [captions(resumed.take(step, 4)) for step in range(10, 12)] == expected[10:]
        return len(files.opened)

    # Steps 0-9 are 40 of rank 0's samples, about five of its epochs.
    with_sizes, without = resume(state), resume({})
    assert with_sizes <= 5
    assert without >= 8


def test_shards_not_a_multiple_of_the_ranks_are_still_dealt_once_per_epoch(
    tmp_path: Path,
) -> None:
    folder = shards(tmp_path, 3, 2)
    names = sorted(p.name for p in folder.iterdir())
    ranks = [ShardedCaptions(local(folder), names, seed=0, rank=r, world=2) for r in (0, 1)]
    for epoch in range(4):
        dealt = [shard for r in ranks for shard in r._my_shards(epoch)[0]]
        assert sorted(dealt) == names, epoch


def test_the_next_epoch_visits_shards_in_another_order(tmp_path: Path) -> None:
    folder = shards(tmp_path, 8, 2)
    names = sorted(p.name for p in folder.iterdir())
    stream = ShardedCaptions(local(folder), names, seed=1, rank=0, world=1)
    first = stream._my_shards(0)[0]
    assert sorted(first) == names
    assert any(stream._my_shards(epoch)[0] != first for epoch in range(1, 4))


def test_indexed_stream_is_a_seeded_shuffle_dealt_to_ranks(tmp_path: Path) -> None:
    for index in range(12):
        (tmp_path / f"{index:02d}.png").write_bytes(png(index))
        (tmp_path / f"{index:02d}.txt").write_text(f"caption {index}")
    files = local(tmp_path)
    pairs = layout_of(files, "folder").pairs

    def stream(rank: int) -> IndexedCaptions:
        return IndexedCaptions(files, pairs, seed=2, rank=rank, world=2)

    seen = captions(stream(0).take(0, 3)) + captions(stream(0).take(1, 3))
    seen += captions(stream(1).take(0, 3)) + captions(stream(1).take(1, 3))
    assert sorted(seen) == sorted(f"caption {i}" for i in range(12))
    assert seen[:3] != [f"caption {i}" for i in range(3)], "shuffled"
    assert captions(stream(1).take(5, 3)) == captions(stream(1).take(5, 3))


def test_a_dataset_unzipped_on_a_mac_trains_on_its_images_only(tmp_path: Path) -> None:
    """macOS zips carry `__MACOSX/` and `._NAME` metadata beside each file, named like
    images and captions: they are no samples. A caption saved with a byte-order mark
    (Notepad) is read without it."""
    for index in range(2):
        (tmp_path / f"{index}.png").write_bytes(png(index))
        (tmp_path / f"._{index}.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (tmp_path / f"._{index}.txt").write_bytes(b"\x00\x05\x16\x07")
        (tmp_path / "__MACOSX" / f"{index}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "__MACOSX" / f"{index}.png").write_bytes(b"\x00\x05\x16\x07")
        (tmp_path / "__MACOSX" / f"{index}.txt").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "0.txt").write_bytes("\ufeffa red disc\r\n".encode())
    (tmp_path / "1.txt").write_text("a dark disc")
    files = local(tmp_path)
    layout = layout_of(files, "auto")
    assert layout.pairs == [("0.png", "0.txt"), ("1.png", "1.txt")]
    taken = IndexedCaptions(files, layout.pairs, seed=0, rank=0, world=1).take(0, 2)
    assert sorted(captions(taken)) == ["a dark disc", "a red disc"]


def test_captions_and_shards_named_in_capitals_are_read(tmp_path: Path) -> None:
    """Windows tools and cameras write `NAME.TXT` and `NAME.JPG`; where a folder holds
    both `NAME.txt` and `NAME.TXT`, the lower-case one is the caption."""
    for index in range(3):
        (tmp_path / f"{index}.PNG").write_bytes(png(index))
    (tmp_path / "0.TXT").write_text("a red disc")
    (tmp_path / "1.Caption").write_text("a green disc")
    (tmp_path / "2.TXT").write_text("stale")
    (tmp_path / "2.txt").write_text("a blue disc")
    layout = layout_of(local(tmp_path), "auto")
    assert layout.pairs == [("0.PNG", "0.TXT"), ("1.PNG", "1.Caption"), ("2.PNG", "2.txt")]
    shards(tmp_path / "wds", 1, 1).joinpath("shard-000.tar").rename(tmp_path / "wds" / "A.TAR")
    assert layout_of(local(tmp_path / "wds"), "auto").shards == ["A.TAR"]


def test_a_caption_in_another_encoding_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A local folder's are refused before training; a shard's (read as training goes)
    train with the undecodable bytes replaced, the file named once in the log."""
    (tmp_path / "0.png").write_bytes(png(0))
    (tmp_path / "0.txt").write_text("a photo of a café")
    (tmp_path / "1.png").write_bytes(png(1))
    (tmp_path / "1.txt").write_bytes("a photo of a café".encode("cp1252"))
    with pytest.raises(JobInputError) as refused:
        check_dataset(CaptionDataset(uri=str(tmp_path)), S3Settings())
    assert str(refused.value) == (
        f"spec.data.dataset.uri: {tmp_path / '1.txt'}: the caption is not UTF-8 text "
        "(byte 0xe9 at offset 16); save it as UTF-8"
    )

    shard = write_shard(
        tmp_path / "wds" / "s.tar", [("x.png", png(0)), ("x.txt", "café".encode("cp1252"))]
    )
    for _ in range(2):  # two epochs' visits
        with shard.open("rb") as stream:
            (sample,) = tar_samples(stream, str(shard))
        assert sample.caption == "caf\ufffd"
    named = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert named == [
        f"{shard}:x: the caption is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8 "
        "(it trains with those bytes replaced)"
    ]
