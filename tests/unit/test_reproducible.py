"""The same weights saved twice are the same bytes, whatever order safetensors wrote
their metadata in."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.trainer.outputs.reproducible import sort_metadata

TENSORS = {"down.weight": torch.arange(6.0).reshape(2, 3), "up.weight": torch.ones(3, 2)}
METADATA = {"format": "pt", "ss_network_dim": "8", "lora_adapter_metadata": '{"r": 8}', "é": "ü"}


def metadata_order(path: Path) -> list[str]:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return list(json.loads(raw[8 : 8 + size])["__metadata__"])


def test_saved_twice_the_same_bytes(tmp_path: Path) -> None:
    files = []
    for attempt in range(6):  # the writer's order changes with its hash seed
        folder = tmp_path / f"save-{attempt}" / "unet"
        folder.mkdir(parents=True)
        order = list(METADATA.items())[attempt % 4 :] + list(METADATA.items())[: attempt % 4]
        save_file(TENSORS, folder / "weights.safetensors", metadata=dict(order))
        sort_metadata(folder.parent)
        files.append(folder / "weights.safetensors")

    digests = {hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    assert len(digests) == 1
    assert metadata_order(files[0]) == sorted(METADATA)
    loaded = load_file(files[0])
    for name, tensor in TENSORS.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    with safe_open(files[0], "pt") as handle:
        assert handle.metadata() == METADATA


def test_a_file_without_metadata_is_left_as_it_is(tmp_path: Path) -> None:
    save_file(TENSORS, tmp_path / "plain.safetensors")
    before = (tmp_path / "plain.safetensors").read_bytes()
    sort_metadata(tmp_path)
    assert (tmp_path / "plain.safetensors").read_bytes() == before
