"""Result files whose bytes depend only on their contents.

safetensors writes a file's `__metadata__` in the order of a Rust hash map, which
changes from process to process: the same weights saved twice (a finished job run
again, the same job on two machines) would get two SHA-256 digests, in the model card
and in `status.artifacts`. `sort_metadata` rewrites each header with its metadata keys
in order, at the same length, in place.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

HEADER_SIZE_BYTES = 8  # little-endian u64: the JSON header's length


def sort_metadata(folder: Path) -> None:
    """Every `.safetensors` file under `folder`, its metadata keys sorted."""
    for path in sorted(folder.rglob("*.safetensors")):
        _sort_file(path)


def _sort_file(path: Path) -> None:
    with path.open("r+b") as handle:
        size = int.from_bytes(handle.read(HEADER_SIZE_BYTES), "little")
        header = json.loads(handle.read(size))
        metadata = header.get("__metadata__")
        if not metadata:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # another writer's escaping: leave the file as it is
            log.debug("%s: header not rewritten (%d > %d bytes)", path, len(text), size)
            return
        handle.seek(HEADER_SIZE_BYTES)
        handle.write(text.ljust(size))  # safetensors pads headers with spaces
