"""`training.ema`: every validation samples and scores the EMA weights, which are what the
job saves, and the trained weights go back into the model after it, bit for bit.

Two runs of one job, one process each, differ only in `maxSteps` (4 and 2): they train
steps 1 and 2 alike. The long run validates step 2 mid-run; the short run validates it
with its results, from the weights it saves. With `output.from: best` the long run's
result is the chosen step's EMA, from that step's checkpoint.
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
    folder: Path, model: Path, images: Path, evaluators: tuple[Path, Path], steps: int
) -> Path:
    folder.mkdir()
    clip, dino = evaluators
    return job_file(
        folder,
        model,
        images,
        method="dreambooth",
        training={"maxSteps": steps, "learningRate": 1e-3, "ema": {"enabled": True, "decay": 0.9}},
        # min: here step 2 scores lower, so the long run's result comes from step 2's
        # checkpoint (the assertions hold whichever step is chosen).
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
    ema = torch.load(folder / "ema.pt", weights_only=False)["shadow_params"]
    return trained, ema


def test_validations_judge_the_ema_weights_the_job_saves(
    tmp_path: Path, tiny_model: Path, disc_images: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    from diffusers import UNet2DConditionModel

    long = ema_job(tmp_path / "long", tiny_model, disc_images, tiny_evaluators, steps=4)
    short = ema_job(tmp_path / "short", tiny_model, disc_images, tiny_evaluators, steps=2)
    finished = finetune_run(long, nproc=1)
    finetune_run(short, nproc=1)
    long_out, short_out = long.parent / "out", short.parent / "out"

    # Step 2 mid-run looks and scores as step 2's saved result: the EMA, not the trained weights.
    grid = Path("samples") / "step-00000002" / "grid.png"
    assert np.array_equal(pixels(long_out / grid), pixels(short_out / grid))
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
    # step 2, saved after it, holds what the short run's holds (saved before its own).
    long_trained, long_ema = checkpoint(long_out, 2)
    short_trained, _ = checkpoint(short_out, 2)
    assert long_trained.keys() == short_trained.keys()
    for name, weight in long_trained.items():
        assert torch.equal(weight, short_trained[name]), name

    # output.from: best with EMA: the chosen step's EMA, from its checkpoint.
    chosen = int(re.search(r"the weights of step (\d+)", finished.stdout).group(1))
    trained, ema = checkpoint(long_out, chosen) if chosen != 2 else (long_trained, long_ema)
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
