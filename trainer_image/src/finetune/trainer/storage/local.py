"""A local folder as a `Store`; writes go through a `.partial` file renamed once complete."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from finetune.trainer.storage.files import is_partial, write_text_whole, written_whole


def copy_whole(source: Path, target: Path) -> None:
    """Copy `source` to `target`, written whole; a file onto itself is a no-op."""
    if target.resolve() == source.resolve():
        return
    with written_whole(target) as partial:
        shutil.copyfile(source, partial)


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def uri_of(self, key: str) -> str:
        return str(self.root / key)

    def put_file(self, path: Path, key: str) -> None:
        copy_whole(path, self.root / key)

    def get_file(self, key: str, path: Path) -> None:
        copy_whole(self.root / key, path)

    def keys(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not is_partial(key):
                yield key, path.stat().st_size

    def top_level(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def open(self, key: str) -> IO[bytes]:
        return (self.root / key).open("rb")

    def read_text(self, key: str) -> str | None:
        try:
            return (self.root / key).read_text()
        except FileNotFoundError:
            return None

    def write_text(self, key: str, text: str) -> None:
        write_text_whole(self.root / key, text)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            (self.root / key).unlink(missing_ok=True)
