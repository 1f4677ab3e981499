"""`training.ema`: every validation samples and scores the EMA weights, which are what the
job saves, and the trained weights go back into the model after it, bit for bit.

Three runs of one job, one process each, train steps 1 and 2 alike: `long` (4 steps)
validates step 2 mid-run; `short` (2 steps) validates it with its results, from the
weights it saves; `plain` (2 steps) keeps no EMA, so its samples are the trained weights'.
With `output.from: best` the long run's result is the chosen step's EMA, from that step's
checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from finetune.api.training import TrainingSpec
from finetune.trainer.evaluation.scores import settings_basis
from tests.trainer.jobs import PROMPT, finetune_run, job_file, train_log

pytestmark = pytest.mark.slow


def ema_job(
    folder: Path,
    model: Path,
    images: Path,
    evaluators: tuple[Path, Path],
    steps: int,
    ema: bool = True,
) -> Path:
    folder.mkdir()
    clip, dino = evaluators
    return job_file(
        folder,
        model,
        images,
        method="dreambooth",
        training={"maxSteps": steps, "learningRate": 1e-3, "ema": {"enabled": ema, "decay": 0.9}},
        # min: here step 2 scores lower than step 4, so the long run's result comes from
        # step 2's checkpoint (its EMA loaded back at the end).
        checkpointing={"everyNSteps": 2, "keepBest": {"metric": "dino", "mode": "min"}},
        validation={
            "prompts": [PROMPT],
            "everyNSteps": 2,
            "imagesPerPrompt": 1,
            "inferenceSteps": 2,
            "metrics": ["dino"],
            "evaluator": {"clipModel": str(clip), "dinoModel": str(dino)},
        },
        output={"uri": str(folder / "out"), "from": "best"},
    )


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def checkpoint(out: Path, step: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The trained UNet's weights in the checkpoint of `step`, and its EMA's."""
    folder = out / "checkpoints" / f"step-{step:08d}"
    states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    trained = {
        k.removeprefix("unet."): v for k, v in states["module"].items() if k.startswith("unet.")
    }
    ema = (
        torch.load(folder / "ema.pt", weights_only=False, map_location="cpu")["shadow_params"]
        if (folder / "ema.pt").exists()
        else []
    )
    return trained, ema


def test_validations_judge_the_ema_weights_the_job_saves(
    tmp_path: Path, tiny_model: Path, disc_images: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    from diffusers import UNet2DConditionModel

    long = ema_job(tmp_path / "long", tiny_model, disc_images, tiny_evaluators, steps=4)
    short = ema_job(tmp_path / "short", tiny_model, disc_images, tiny_evaluators, steps=2)
    plain = ema_job(tmp_path / "plain", tiny_model, disc_images, tiny_evaluators, 2, ema=False)
    finished = finetune_run(long, nproc=1)
    finetune_run(short, nproc=1)
    finetune_run(plain, nproc=1)
    long_out, short_out, plain_out = (job.parent / "out" for job in (long, short, plain))

    # Step 2 mid-run looks and scores as step 2's saved result: the EMA, not the trained weights.
    grid = Path("samples") / "step-00000002" / "grid.png"
    assert np.array_equal(pixels(long_out / grid), pixels(short_out / grid))
    assert not np.array_equal(pixels(long_out / grid), pixels(plain_out / grid))
    scored = [
        {e["step"]: e["validation"]["dino"] for e in train_log(out) if "validation" in e}
        for out in (long_out, short_out)
    ]
    assert scored[0][2] == pytest.approx(scored[1][2], abs=1e-6)
    # Each validation names the settings it was scored with: the same in both runs.
    (basis,) = {
        e["basis"] for out in (long_out, short_out) for e in train_log(out) if "validation" in e
    }
    assert basis == settings_basis(
        TrainingSpec.model_validate(yaml.safe_load(long.read_text())["spec"])
    )

    # The trained weights went back after that validation: the long run's checkpoint of
    # step 2, saved after it, holds what the others hold (saved before their own, and
    # plain's with no EMA at all).
    long_trained, long_ema = checkpoint(long_out, 2)
    for other in (short_out, plain_out):
        other_trained = checkpoint(other, 2)[0]
        assert long_trained.keys() == other_trained.keys()
        for name, weight in long_trained.items():
            assert torch.equal(weight, other_trained[name]), name

    # output.from: best with EMA: the chosen step's EMA, from its checkpoint.
    chosen = re.search(r"the weights of step (\d+)", finished.stdout)
    assert chosen is not None, finished.stdout
    assert chosen.group(1) == "2", "step 4 scored lower: flip keepBest's mode"
    trained, ema = long_trained, long_ema  # step 2's
    result = UNet2DConditionModel.from_pretrained(long_out / "unet")
    saved = list(result.parameters())
    assert len(saved) == len(ema)
    for weight, average in zip(saved, ema, strict=True):
        torch.testing.assert_close(weight.float(), average.float())
    names = [name for name, _ in result.named_parameters()]
    moved = [
        n
        for n, w in zip(names, saved, strict=True)
        if not torch.allclose(w.float(), trained[n].float())
    ]
    assert moved, "the result is the trained weights, not their EMA"
