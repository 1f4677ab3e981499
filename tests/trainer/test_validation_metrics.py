"""Subject and prompt fidelity scored at every validation of a real run (two processes,
tiny model, tiny random CLIP and DINO): the numbers agree with a direct computation on
the saved samples and the held-out images, and reach the train log, the Prometheus
gauges, the job's status and the model card."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from finetune.assets import write_images
from tests.fake_pushgateway import FakePushgateway
from tests.fake_status_api import FakeApi
from tests.fidelity import direct_scores
from tests.trainer.jobs import PROMPT, finetune_run, job_file, refused, status_env, train_log

pytestmark = pytest.mark.slow

METRICS = ["clipText", "clipImage", "dino"]


@pytest.fixture
def gateway() -> Iterator[FakePushgateway]:
    server = FakePushgateway()
    yield server
    server.close()


def metrics_job(tmp_path: Path, tiny_model: Path, images: Path, clip: Path, dino: Path) -> Path:
    return job_file(
        tmp_path,
        tiny_model,
        images,
        data={
            "concepts": [{"instanceImages": str(images), "instancePrompt": PROMPT, "holdOut": 2}]
        },
        training={"maxSteps": 4},
        checkpointing={"everyNSteps": 4},
        validation={
            "prompts": [PROMPT, "a sks disc on grass"],
            "everyNSteps": 2,
            "imagesPerPrompt": 2,
            "inferenceSteps": 2,
            "metrics": METRICS,
            "evaluator": {"clipModel": str(clip), "dinoModel": str(dino)},
        },
    )


def gauge(text: str, metric: str) -> float:
    found = re.search(rf'finetune_validation_score{{[^}}]*metric="{metric}"[^}}]*}} (\S+)', text)
    assert found is not None, f"no {metric} gauge in:\n{text}"
    assert 'concept="all"' in found.group(0)
    return float(found.group(1))


def test_each_validation_is_scored_and_reported_everywhere(
    tmp_path: Path,
    tiny_model: Path,
    tiny_evaluators: tuple[Path, Path],
    api: FakeApi,
    gateway: FakePushgateway,
) -> None:
    clip, dino = tiny_evaluators
    images = write_images(tmp_path / "discs", 6, resolution=64)
    job = metrics_job(tmp_path, tiny_model, images, clip, dino)
    env = {**status_env(tmp_path, api.url), "FINETUNE_PUSHGATEWAY_URL": gateway.url}
    finetune_run(job, nproc=2, env=env)
    out = tmp_path / "out"

    # The train log: one line per validation (step 2, and the end), beside the steps'.
    log = train_log(out)
    scored = [e for e in log if "validation" in e]
    assert [e["step"] for e in scored] == [2, 4]
    assert [e["step"] for e in log if "validation" not in e] == [1, 2, 3, 4]
    final = scored[-1]["validation"]
    assert set(final) == set(METRICS)

    # The numbers: the saved samples against the two held-out images, written out.
    prompts = [PROMPT, "a sks disc on grass"]
    folder = out / "samples" / "step-00000004"
    samples = [
        [Image.open(folder / f"prompt-{p:02d}-{n:02d}.png").convert("RGB") for n in range(2)]
        for p in range(2)
    ]
    held_out = [Image.open(p).convert("RGB") for p in sorted(images.glob("*.png"))[-2:]]
    assert final == pytest.approx(direct_scores(clip, dino, prompts, samples, held_out), abs=1e-4)

    # Prometheus: the final push holds the last validation's scores.
    text = gateway.pushes[-1]
    for metric in METRICS:
        assert gauge(text, metric) == pytest.approx(final[metric], rel=1e-6)
    assert re.search(r"finetune_validation_step{[^}]*} 4\.0", text)

    # The job's status: the latest scores, in the last progress update.
    progress = [s["progress"] for s in api.statuses() if "progress" in s]
    latest = progress[-1]["metrics"]
    assert latest["step"] == 4
    assert (latest["clipText"], latest["clipImage"], latest["dino"]) == pytest.approx(
        (final["clipText"], final["clipImage"], final["dino"]), rel=1e-6
    )
    assert any(p.get("metrics") and p["metrics"]["step"] == 2 for p in progress)

    # The model card: a row per validation step.
    card = (out / "README.md").read_text()
    assert "## Validation metrics" in card
    assert "| step | concept | clipText | clipImage | dino |" in card
    for entry in scored:
        values = " | ".join(f"{entry['validation'][m]:.4f}" for m in METRICS)
        assert f"| {entry['step']} | all | {values} |" in card


def test_holding_out_every_image_is_refused(
    tmp_path: Path, tiny_model: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    images = write_images(tmp_path / "discs", 3, resolution=64)
    job = job_file(
        tmp_path,
        tiny_model,
        images,
        data={
            "concepts": [{"instanceImages": str(images), "instancePrompt": PROMPT, "holdOut": 3}]
        },
    )
    refused(job, "spec.data.concepts[0].holdOut: 3 must be fewer than the concept's 3 images")


def test_an_evaluator_that_is_not_clip_is_refused_before_training(
    tmp_path: Path, tiny_model: Path, disc_images: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    _, dino = tiny_evaluators
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        validation={
            "prompts": [PROMPT],
            "metrics": ["clipText"],
            "evaluator": {"clipModel": str(dino)},
        },
    )
    refused(job, "spec.validation.evaluator.clipModel", "a 'vit' model, not 'clip'")


def test_prior_preservation_drift_scores_class_samples_against_class_images(
    tmp_path: Path, tiny_model: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    clip, dino = tiny_evaluators
    images = write_images(tmp_path / "discs", 4, resolution=64)
    classes = write_images(tmp_path / "class", 3, resolution=64)
    class_prompt = "a photo of a disc"
    concept = {
        "instanceImages": str(images),
        "instancePrompt": PROMPT,
        "classPrompt": class_prompt,
        "classImages": {"uri": str(classes), "count": 3},
    }
    job = job_file(
        tmp_path,
        tiny_model,
        images,
        data={"concepts": [concept]},
        training={"maxSteps": 2, "priorPreservation": True},
        checkpointing={"everyNSteps": 2},
        validation={
            "prompts": [PROMPT],
            "everyNSteps": 2,
            "imagesPerPrompt": 2,
            "inferenceSteps": 2,
            "metrics": ["dino"],
            "evaluator": {"clipModel": str(clip), "dinoModel": str(dino)},
        },
    )
    finetune_run(job, nproc=1)
    out = tmp_path / "out"

    # The class prompt's samples lie beside the validation prompts', with their grid.
    folder = out / "samples" / "step-00000002"
    assert (folder / "class-grid.png").is_file()
    class_samples = [Image.open(folder / f"class-00-{n:02d}.png").convert("RGB") for n in (0, 1)]
    references = [Image.open(p).convert("RGB") for p in sorted(classes.glob("*.png"))]
    expected = direct_scores(clip, dino, [class_prompt], [class_samples], references)["dino"]

    (final,) = [e["validation"] for e in train_log(out) if "validation" in e]
    assert set(final) == {"dino", "pres"}
    assert final["pres"] == pytest.approx(expected, abs=1e-4)
    card = (out / "README.md").read_text()
    assert "| step | concept | dino | pres |" in card
    assert f"| 2 | all | {final['dino']:.4f} | {final['pres']:.4f} |" in card
