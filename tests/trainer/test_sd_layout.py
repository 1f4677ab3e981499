"""An SD 1.x LoRA's result files keep the layout they had before model families: the
output folder's file names, and each safetensors file's header (every key with its dtype,
shape and byte offsets, and the metadata diffusers reads back) byte for byte.

The pinned layout (`golden/sd_lora_layout.json`) was written by the trainer before the
SD-specific code moved behind `trainer/families/sd.py`; since then it has gained one file
on purpose, the TensorBoard event file under `logs/` (validation metrics). A change that
means to alter the layout rewrites it with `FINETUNE_UPDATE_GOLDEN=1` and says so in its
commit.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.jobs import PROMPT, finetune_run, job_file

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "sd_lora_layout.json"
# Working state whose layout is not this test's subject (checkpoints have their own tests).
NOT_RESULTS = {"checkpoints", ".run"}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The file's JSON header as written: keys, dtypes, shapes, offsets and metadata."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
    return header


def tensors(header: dict[str, Any]) -> dict[str, Any]:
    """One line per tensor (`F32 [4, 32] @0-512`), the metadata as it is."""
    return {
        key: entry
        if key == "__metadata__"
        else f"{entry['dtype']} {entry['shape']} @{entry['data_offsets'][0]}-{entry['data_offsets'][1]}"
        for key, entry in header.items()
    }


def usage(card: str, base: Path) -> list[str]:
    """The model card's loading snippet, the base model's path made neutral."""
    block = card.split("## How to use", 1)[1].split("```")[1]
    return block.replace(str(base), "BASE").strip().splitlines()


def neutral(name: str) -> str:
    """TensorBoard names its event files by the time, host and process that wrote them."""
    events = "logs/events.out.tfevents."
    return events + "*" if name.startswith(events) else name


def layout(out: Path, base: Path) -> dict[str, Any]:
    files = sorted(
        neutral(p.relative_to(out).as_posix())
        for p in out.rglob("*")
        if p.is_file() and p.relative_to(out).parts[0] not in NOT_RESULTS
    )
    return {
        "files": files,
        "headers": {
            name: tensors(safetensors_header(out / name))
            for name in files
            if name.endswith(".safetensors")
        },
        "usage": usage((out / "README.md").read_text(), base),
    }


def test_sd_lora_files_keep_their_layout(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"trainTextEncoder": True, "maxSteps": 2},
        checkpointing={"everyNSteps": 2},
        validation={"prompts": [PROMPT], "everyNSteps": 2, "inferenceSteps": 2},
        output={"formats": ["diffusers", "kohya"]},
    )
    finetune_run(job)
    found = layout(tmp_path / "out", tiny_model)
    if os.environ.get("FINETUNE_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    assert found == json.loads(GOLDEN.read_text())
