"""A model folder's fingerprint: what tells a resumed run whether the files at its
`baseModel.uri` are still the ones its checkpoints were trained on.

It must cost next to nothing for a model of many GB, so it never reads a weight file
whole: a small file (configs, tokenizer files) is hashed whole; a large one by its size
and a few sampled chunks (`sampled_regions`: its start, middle and end). Another model
put in the folder (a fine-tune of the same architecture has the same sizes and the same
safetensors header, but other weights everywhere) changes it; a byte edited outside
the sampled chunks does not: it is a guard against a replaced model, not a checksum.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune.trainer.storage.files import is_partial

CHUNK = 1 << 20  # bytes read at each sampled position of a large file
WHOLE = 3 * CHUNK  # files up to this size are hashed whole


def sampled_regions(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes of a file of `size` bytes that its fingerprint reads."""
    if size <= WHOLE:
        return [(0, size)]
    return [(0, CHUNK), ((size - CHUNK) // 2, CHUNK), (size - CHUNK, CHUNK)]


# At the top of a model folder only these are the model (`model_index.json`, a VAE's
# `config.json` and weights); a model card, licence or preview image there is not.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def _is_model_file(path: Path, folder: Path) -> bool:
    parts = path.relative_to(folder).parts
    if any(part.startswith(".") for part in parts) or is_partial(path.name):
        return False  # `.gitattributes`, `.cache/`, an unfinished download
    return len(parts) > 1 or path.suffix in MODEL_FILE_SUFFIXES


def _files(folder: Path) -> list[Path]:
    """The folder's model files (links followed, as in a hub snapshot), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and _is_model_file(p, folder))


def fingerprint(folder: Path) -> str:
    """The hex SHA-256 of every file's relative path, size and sampled bytes."""
    digest = hashlib.sha256()
    for path in _files(folder):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            for offset, length in sampled_regions(size):
                handle.seek(offset)
                digest.update(handle.read(length))
    return digest.hexdigest()
