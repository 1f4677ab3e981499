"""Local files written whole or not at all, their digests, and the cache's folder names.

Every file the trainer writes where a reader (a resumed run, a restarted pod, a user)
may look goes through a `.partial` file beside it, renamed into place once complete:
a killed writer leaves only a `.partial`, never a truncated file under the real name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial"


def cache_key(uri: str) -> str:
    """A short, stable folder name for what `uri` names in the local cache."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def file_for_key(root: Path, key: str) -> Path | None:
    """Where the object `key` (relative to a prefix) is kept under `root`; None for a key
    no file can mirror: one with an empty, `.` or `..` part (`photos//a.png`, a script's
    doubled slash, or `../a.png`), which would land elsewhere or outside `root`."""
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return root.joinpath(*parts)


def is_partial(path: Path | str) -> bool:
    """A file still being written (or left by a writer that was killed)."""
    return str(path).endswith(PARTIAL)


@contextmanager
def written_whole(target: Path, durable: bool = False) -> Iterator[Path]:
    """The path to write `target`'s bytes to; renamed onto `target` when the block ends
    without an error. `durable`: flushed to the disk first, so a power loss cannot leave
    the name pointing at lost bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + PARTIAL)
    yield partial
    if durable:
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
    partial.replace(target)


def write_text_whole(target: Path, text: str, durable: bool = False) -> None:
    with written_whole(target, durable) as partial:
        partial.write_text(text)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in blocks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()
