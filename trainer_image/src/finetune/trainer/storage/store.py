"""One storage interface for an `s3://` prefix and a local folder, chosen by the URI.

The trainer and the tools put and get whole files, stream a file front to back, list
what is under a path, read and write small texts and delete; keys are relative,
`/`-separated paths. Files arrive whole or not at all (`files.written_whole`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

from finetune.trainer.storage.local import LocalStore
from finetune.trainer.storage.s3 import S3Settings, S3Store


class Store(Protocol):
    uri: str

    def uri_of(self, key: str) -> str: ...
    def put_file(self, path: Path, key: str) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def keys(self, prefix: str = "") -> Iterator[tuple[str, int]]: ...
    def top_level(self) -> list[str]: ...
    def open(self, key: str) -> IO[bytes]: ...
    def read_text(self, key: str) -> str | None: ...
    def write_text(self, key: str, text: str) -> None: ...
    def delete(self, keys: list[str]) -> None: ...


# The stores by URI scheme; anything else is a local path.
SCHEMES: dict[str, Callable[[str, S3Settings], Store]] = {"s3://": S3Store}


def open_store(uri: str, settings: S3Settings | None = None) -> Store:
    for scheme, store in SCHEMES.items():
        if uri.startswith(scheme):
            return store(uri, settings or S3Settings())
    return LocalStore(Path(uri).expanduser())
