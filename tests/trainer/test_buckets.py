"""Aspect-ratio buckets on the tiny SDXL model (on by default for SDXL), 2 processes under
DeepSpeed on CPU: portrait and landscape images train in their own buckets, one shape
per micro-batch, and a run killed and resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from finetune.api.pod import LOG_LEVEL_ENV
from finetune.trainer.engine.trainer import CRASH_AFTER_STEP_ENV
from tests.trainer.jobs import finetune_run, job_file

pytestmark = pytest.mark.slow

# At 128 px the buckets are 64x256, 64x192, 128x128, 192x64 and 256x64.
SIZES = {"tall": (70, 200), "wide": (200, 70)}
BATCH_LINE = re.compile(r"micro-step (\d+), rank (\d): (.+)$")


def mixed_images(folder: Path) -> Path:
    """Two portrait and two landscape photos of a red disc on a plain ground."""
    folder.mkdir()
    for name, (width, height) in SIZES.items():
        for copy in range(2):
            image = Image.new("RGB", (width, height), (180 + 30 * copy, 200, 170))
            radius = min(width, height) // 3
            middle = (width // 2, height // 2 + 10 * copy)
            ImageDraw.Draw(image).ellipse(
                [middle[0] - radius, middle[1] - radius, middle[0] + radius, middle[1] + radius],
                fill=(200, 40, 40),
            )
            image.save(folder / f"{name}-{copy}.png")
    return folder


def test_sdxl_lora_in_buckets_keeps_one_shape_per_batch_and_resumes_exactly(
    tmp_path: Path, tiny_sdxl_model: Path
) -> None:
    images = mixed_images(tmp_path / "images")
    spec = {
        "data": {"resolution": 128, "randomFlip": True},  # random crops and flips
        "training": {"maxSteps": 6, "trainTextEncoder": True},
    }
    jobs = {}
    for name in ("straight", "crashed"):
        (tmp_path / name).mkdir()
        jobs[name] = job_file(tmp_path / name, tiny_sdxl_model, images, **spec)
    run = finetune_run(jobs["straight"], env={LOG_LEVEL_ENV: "debug"})
    killed = finetune_run(jobs["crashed"], env={CRASH_AFTER_STEP_ENV: "4"}, expect=None)
    assert killed.returncode != 0
    assert "step-00000003" in finetune_run(jobs["crashed"]).stderr

    listed = "aspect-ratio buckets at 128 px (width x height: instance images): 64x256: 0, "
    assert f"{listed}64x192: 2, 128x128: 0, 192x64: 2, 256x64: 0" in run.stderr
    batches = {}
    for line in run.stderr.splitlines():
        found = BATCH_LINE.search(line)
        if found:
            batches[int(found[1]), int(found[2])] = found[3]
    assert sorted(batches) == [(step, rank) for step in range(6) for rank in (0, 1)]
    assert set(batches.values()) == {"64x192", "192x64"}, batches  # one shape per batch

    expected, actual = (
        load_file(tmp_path / name / "out" / "pytorch_lora_weights.safetensors")
        for name in ("straight", "crashed")
    )
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
