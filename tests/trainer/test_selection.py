"""Choosing by a validation metric in real runs (two processes, tiny model, tiny random
CLIP and DINO): TensorBoard event files of every step and validation, the best
checkpoint kept past `keepLast` and across a resume, `output.from: best`, and early
stopping of a run whose metric is flat.

A learning rate of 1e-9 keeps the samples' pixels (and so every score) the same from
one validation to the next, while the LoRA weights still move: the first validation is
then the best (an equal score is no improvement) and the metric never improves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune.trainer.engine.trainer import CRASH_AFTER_STEP_ENV
from tests.fake_status_api import FakeApi
from tests.trainer.jobs import (
    PROMPT,
    finetune_run,
    job_file,
    status_env,
    tensorboard_images,
    tensorboard_scalars,
    train_log,
)

pytestmark = pytest.mark.slow

FLAT = 1e-9


def validation(clip: Path, dino: Path, every: int, metrics: list[str]) -> dict[str, Any]:
    return {
        "prompts": [PROMPT],
        "everyNSteps": every,
        "imagesPerPrompt": 1,
        "inferenceSteps": 2,
        "metrics": metrics,
        "evaluator": {"clipModel": str(clip), "dinoModel": str(dino)},
    }


def up_norms(tensors: dict[str, torch.Tensor]) -> list[float]:
    """The norms of the LoRA up (B) matrices, sorted: they start at zero and grow with
    every step, so they tell steps apart whatever the keys are called."""
    return sorted(
        float(t.float().norm()) for k, t in tensors.items() if "lora_B" in k or "lora.up" in k
    )


def checkpoint_norms(folder: Path) -> list[float]:
    states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    return up_norms(states["module"])


def test_keep_best_survives_pruning_and_resume_and_is_the_result(
    tmp_path: Path, tiny_model: Path, disc_images: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    clip, dino = tiny_evaluators
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 6, "learningRate": FLAT},
        validation=validation(clip, dino, 2, ["dino", "clipText"]),
        checkpointing={"everyNSteps": 6, "keepLast": 1, "keepBest": {"metric": "dino"}},
        output={"uri": str(tmp_path / "out"), "from": "best"},
    )
    out = tmp_path / "out"
    checkpoints = out / "checkpoints"
    # Dies after step 4, whose checkpoint (saved for its validation) is the newest.
    finetune_run(job, env={CRASH_AFTER_STEP_ENV: "4"}, expect=None)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    best_norms = checkpoint_norms(checkpoints / "step-00000002")

    second = finetune_run(job)
    assert "resumed from" in second.stderr
    # Step 4 went once step 6 counted; step 2, the best, stays.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000006"]

    # The result holds step 2's weights, not the last step's.
    result = up_norms(load_file(out / "pytorch_lora_weights.safetensors"))
    assert result == pytest.approx(best_norms, rel=1e-5)
    assert result != pytest.approx(checkpoint_norms(checkpoints / "step-00000006"), rel=1e-2)
    card = (out / "README.md").read_text()
    assert "These are the weights of step 2, the best validation by `dino`" in card
    assert "![samples](samples/step-00000002/grid.png)" in card
    assert "the weights of step 2, the best validation" in second.stdout

    # TensorBoard: every step once (the crashed run's step 4 left for the resumed
    # run's), each validation's scores and grid; one event file per process run.
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 2
    shown = tensorboard_scalars(out / "logs")
    assert [step for step, _ in shown["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in shown["train/learning_rate"]] == [1, 2, 3, 4, 5, 6]
    assert "train/images_per_second" in shown
    logged = [e for e in train_log(out) if "validation" in e]
    for metric in ("dino", "clipText"):
        steps, values = zip(*shown[f"validation/{metric}"], strict=True)
        assert list(steps) == [e["step"] for e in logged] == [2, 4, 6]
        assert values == pytest.approx([e["validation"][metric] for e in logged])
    assert tensorboard_images(out / "logs", "validation/samples") == [2, 4, 6]


def test_a_flat_metric_stops_the_run_early_with_its_results(
    tmp_path: Path,
    tiny_model: Path,
    disc_images: Path,
    tiny_evaluators: tuple[Path, Path],
    api: FakeApi,
) -> None:
    clip, dino = tiny_evaluators
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={
            "maxSteps": 20,
            "learningRate": FLAT,
            "earlyStopping": {"metric": "clipText", "patience": 2},
        },
        validation=validation(clip, dino, 1, ["clipText"]),
        checkpointing={"everyNSteps": 20},
    )
    run = finetune_run(job, env=status_env(tmp_path, api.url))  # exit 0
    out = tmp_path / "out"

    # Validations 1, 2 and 3; after the third, two without an improvement: stop.
    assert "Stopped early after step 3: clipText has not improved" in run.stdout
    log = train_log(out)
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3]
    assert [e["step"] for e in log if "validation" in e] == [1, 2, 3]
    (stopped,) = [e for e in log if "earlyStopped" in e]
    assert stopped["step"] == 3
    assert stopped["earlyStopped"]["bestStep"] == 1

    # The results, as for a finished run, from step 3.
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "for 3 steps" in (out / "README.md").read_text()
    assert f"Done: 3 steps; results in {out}" in run.stdout

    # The job's status says why it ended (the operator's condition reason).
    early = [s["earlyStop"] for s in api.statuses() if s.get("earlyStop")]
    assert early
    assert early[-1]["step"] == 3
    assert early[-1]["bestStep"] == 1
    assert early[-1]["metric"] == "clipText"
    assert any(s.get("artifacts") for s in api.statuses())
