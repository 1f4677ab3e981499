"""Subject and prompt fidelity: the arithmetic, and the scores of real (tiny, random)
CLIP and DINO models against a direct computation with transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune.api import FineTuneJob, TrainingSpec
from finetune.assets import write_images
from finetune.trainer.evaluation import fidelity
from finetune.trainer.evaluation.embedders import DinoEmbedder
from finetune.trainer.evaluation.identifiers import identifiers, scored_text
from finetune.trainer.evaluation.references import reference_groups
from finetune.trainer.evaluation.scores import Scores, history
from finetune.trainer.evaluation.validation import Evaluation
from tests.fidelity import direct_clip_scores, direct_scores
from tests.support import lcm_job, lora_job

CPU = torch.device("cpu")


def test_prompt_fidelity_is_the_cosine_of_each_image_with_its_prompt() -> None:
    images, prompts = torch.randn(5, 8), torch.randn(5, 8)
    expected = [F.cosine_similarity(images[i], prompts[i], dim=0) for i in range(5)]
    torch.testing.assert_close(fidelity.prompt_fidelity(images, prompts), torch.stack(expected))


def test_subject_fidelity_is_the_mean_over_every_reference() -> None:
    samples, references = torch.randn(4, 8), torch.randn(3, 8)
    direct = torch.tensor(
        [[float(F.cosine_similarity(s, r, dim=0)) for r in references] for s in samples]
    ).mean(dim=1)
    torch.testing.assert_close(fidelity.subject_fidelity(samples, references), direct)
    # Scaling an embedding changes nothing: only directions count.
    torch.testing.assert_close(fidelity.subject_fidelity(samples * 3, references / 7), direct)


def test_an_image_scores_one_against_itself() -> None:
    same = torch.randn(2, 16)
    torch.testing.assert_close(fidelity.subject_fidelity(same[:1], same[:1]), torch.ones(1))
    with pytest.raises(ValueError, match="no reference"):
        fidelity.subject_fidelity(same, same[:0])


def pictures(folder: Path) -> list[Any]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def noise(count: int, seed: int = 1) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)
    ]


def spec_for(images: Path, hold_out: int = 0, **validation: Any) -> TrainingSpec:
    concept = {"instanceImages": str(images), "instancePrompt": "a sks disc", "holdOut": hold_out}
    document = lora_job(
        data={"concepts": [concept]},
        validation={"prompts": ["a sks disc", "a sks disc on grass"], **validation},
    )
    return FineTuneJob.model_validate(document).spec


def test_scores_agree_with_a_direct_computation(
    tmp_path: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    clip, dino = tiny_evaluators
    images = write_images(tmp_path / "discs", 6, resolution=64)
    spec = spec_for(images, hold_out=2, metrics=["clipText", "clipImage", "dino"])
    evaluation = Evaluation(spec, [images], clip, dino, CPU)
    samples = [noise(3, seed=1), noise(3, seed=2)]
    scores = evaluation.score(10, spec.validation.prompts, samples)
    held_out = pictures(images)[-2:]  # the last two by name
    expected = direct_scores(clip, dino, spec.validation.prompts, samples, held_out)
    assert scores.step == 10
    assert scores.overall == pytest.approx(expected, abs=1e-5)
    assert scores.concepts == {}
    # The reference embeddings are computed once, and kept for the next validation.
    cached = dict(evaluation._references)
    again = evaluation.score(20, spec.validation.prompts, samples)
    assert again.overall == pytest.approx(expected, abs=1e-5)
    assert all(evaluation._references[k] is v for k, v in cached.items())


def test_the_subject_itself_scores_higher_than_noise(
    tmp_path: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    """The metric can fail: samples that are the subject's own photos beat noise."""
    clip, dino = tiny_evaluators
    images = write_images(tmp_path / "discs", 6, resolution=64)
    spec = spec_for(images, metrics=["clipImage", "dino"])
    evaluation = Evaluation(spec, [images], clip, dino, CPU)
    subject = pictures(images)
    same = evaluation.score(1, spec.validation.prompts, [subject[:3], subject[3:]])
    other = evaluation.score(1, spec.validation.prompts, [noise(3), noise(3, seed=2)])
    assert set(same.overall) == {"clipImage", "dino"}
    for metric in ("clipImage", "dino"):
        assert same.overall[metric] > other.overall[metric], metric


def test_custom_diffusion_scores_each_concept_by_its_token(
    tmp_path: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    clip, dino = tiny_evaluators
    discs = write_images(tmp_path / "discs", 4, resolution=64, seed=1)
    others = write_images(tmp_path / "others", 4, resolution=64, seed=2)
    document = lora_job(
        method="customDiffusion",
        lora=None,
        customDiffusion={"modifierTokens": ["<d>", "<o>"]},
        data={
            "concepts": [
                {"instanceImages": str(discs), "instancePrompt": "a <d> disc"},
                {"instanceImages": str(others), "instancePrompt": "a <o> thing"},
            ]
        },
        validation={
            "prompts": ["a <d> disc", "a <o> thing", "plain"],
            "metrics": ["clipText", "dino"],
        },
    )
    spec: TrainingSpec = FineTuneJob.model_validate(document).spec
    groups = reference_groups(spec, [discs, others])
    assert [(g.label, len(g.images)) for g in groups] == [("<d>", 4), ("<o>", 4)]
    evaluation = Evaluation(spec, [discs, others], clip, dino, CPU)
    d, o = pictures(discs), pictures(others)
    samples = [d[:2], o[:2], noise(2)]
    scores = evaluation.score(5, spec.validation.prompts, samples)
    assert set(scores.concepts) == {"<d>", "<o>"}
    # Each concept: its own prompt's samples against its own images, written out.
    embedder = DinoEmbedder(dino, CPU)
    for token, images in (("<d>", d), ("<o>", o)):
        own, refs = embedder.images(images[:2]), embedder.images(images)
        expected = fidelity.mean(fidelity.subject_fidelity(own, refs))
        assert scores.concepts[token]["dino"] == pytest.approx(expected, abs=1e-5)
    # The whole set: the samples that have a concept (not the "plain" prompt's).
    both = (scores.concepts["<d>"]["dino"] + scores.concepts["<o>"]["dino"]) / 2
    assert scores.overall["dino"] == pytest.approx(both, abs=1e-5)
    assert set(scores.overall) == {"clipText", "dino"}


def test_clip_text_scores_prompts_without_the_subjects_identifier(
    tmp_path: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    """CLIP has never learned `sks`: clipText compares samples with "a photo of disc",
    the word the instance prompt adds to the class prompt left out."""
    clip, dino = tiny_evaluators
    images = write_images(tmp_path / "discs", 4, resolution=64)
    document = lora_job(
        data={
            "concepts": [
                {
                    "instanceImages": str(images),
                    "instancePrompt": "a photo of sks disc",
                    "classPrompt": "a photo of a disc",
                }
            ]
        },
        validation={"prompts": ["a photo of sks disc", "Sks, on grass"], "metrics": ["clipText"]},
    )
    spec: TrainingSpec = FineTuneJob.model_validate(document).spec
    samples = [noise(2, seed=1), noise(2, seed=2)]
    scores = Evaluation(spec, [images], clip, dino, CPU).score(1, spec.validation.prompts, samples)
    scored = direct_scores(clip, dino, ["a photo of disc", "on grass"], samples, pictures(images))
    as_written = direct_scores(clip, dino, spec.validation.prompts, samples, pictures(images))
    assert scores.overall["clipText"] == pytest.approx(scored["clipText"], abs=1e-5)
    assert scored["clipText"] != pytest.approx(as_written["clipText"], abs=1e-5)


@pytest.mark.parametrize(
    ("instance", "class_prompt", "prompt", "text"),
    [
        ("a photo of sks dog", "a photo of a dog", "a sks dog, in the snow", "a dog, in the snow"),
        ("photo of zwx person", "photo of person", "ZWX person.", "person."),
        # More than one word added: nothing is guessed, the prompt is scored as written.
        ("sks dog in a garden", "a dog", "a sks dog in a garden", "a sks dog in a garden"),
        ("a photo of sks dog", None, "a sks dog", "a sks dog"),
    ],
)
def test_the_identifier_is_the_one_word_an_instance_prompt_adds_to_its_class_prompt(
    instance: str, class_prompt: str | None, prompt: str, text: str
) -> None:
    concept = {"instanceImages": "/data", "instancePrompt": instance}
    if class_prompt is not None:
        concept["classPrompt"] = class_prompt
    spec = FineTuneJob.model_validate(lora_job(data={"concepts": [concept]})).spec
    assert scored_text(prompt, identifiers(spec)) == text


def test_custom_diffusion_prompts_are_scored_without_their_modifier_tokens() -> None:
    document = lora_job(
        method="customDiffusion",
        lora=None,
        customDiffusion={"modifierTokens": ["<d>", "<o>"]},
        data={
            "concepts": [
                {"instanceImages": "/d", "instancePrompt": "a <d> disc"},
                {"instanceImages": "/o", "instancePrompt": "a <o> thing"},
            ]
        },
    )
    spec = FineTuneJob.model_validate(document).spec
    assert scored_text("a <d> disc beside a <o> thing", identifiers(spec)) == (
        "a disc beside a thing"
    )


def test_a_token_inside_a_longer_token_is_not_its_concept(tmp_path: Path) -> None:
    """Ten concepts and more, tokens without a closing bracket: `sks10` is its own token
    to the tokenizer, not `sks1` followed by `0`, so its prompts and images are not
    `sks1`'s."""
    tokens = [f"sks{n}" for n in range(1, 11)]
    folders = [write_images(tmp_path / f"c{n}", 2, resolution=64, seed=n) for n in range(10)]
    document = lora_job(
        method="customDiffusion",
        lora=None,
        customDiffusion={"modifierTokens": tokens, "initializerTokens": ["ktn"] * 10},
        data={
            "concepts": [
                {"instanceImages": str(folder), "instancePrompt": f"a {token} thing"}
                for folder, token in zip(folders, tokens, strict=True)
            ]
        },
        validation={"prompts": ["a sks10 thing"], "metrics": ["dino"]},
    )
    spec: TrainingSpec = FineTuneJob.model_validate(document).spec
    groups = reference_groups(spec, folders)
    first, tenth = groups[0], groups[9]
    assert (first.label, tenth.label) == ("sks1", "sks10")
    assert first.images == tuple(sorted(folders[0].iterdir()))  # not the tenth's too
    assert [g.label for g in groups if g.takes("a sks10 thing")] == ["sks10"]
    assert [g.label for g in groups if g.takes("sks1 beside sks10")] == ["sks1", "sks10"]


def test_an_lcm_student_is_scored_against_its_teachers_images(
    tmp_path: Path, tiny_evaluators: tuple[Path, Path]
) -> None:
    """clipImage pairs each sample with the teacher's image of the same prompt and seed:
    a copy of the teacher's images beats noise (the metric can fail), and the numbers
    agree with transformers' own calls, at the validation's step count and at each other."""
    clip, dino = tiny_evaluators
    document = lcm_job(
        validation={"prompts": ["a red disc", "a blue disc"], "metrics": ["clipText", "clipImage"]}
    )
    spec: TrainingSpec = FineTuneJob.model_validate(document).spec
    evaluation = Evaluation(spec, [], clip, dino, CPU)
    made = pictures(write_images(tmp_path / "teacher", 4, resolution=64))
    teacher = [made[:2], made[2:]]
    prompts = spec.validation.prompts
    copy = evaluation.score(
        2, prompts, teacher, teacher=teacher, distilled={1: noisy(), 4: teacher}
    )
    other = evaluation.score(2, prompts, noisy(), teacher=teacher)
    assert list(copy.overall) == ["clipText", "clipImage"]
    assert copy.overall["clipImage"] == pytest.approx(1.0, abs=1e-5)
    assert copy.overall["clipImage"] > other.overall["clipImage"]
    assert copy.distillation[4] == pytest.approx(copy.overall, abs=1e-6)
    assert copy.distillation[1] == pytest.approx(other.overall, abs=1e-6)
    assert other.overall == pytest.approx(
        direct_clip_scores(clip, prompts, noisy(), teacher), abs=1e-5
    )
    # Every figure of a step count, for the gauges and TensorBoard.
    assert sorted(copy.by_steps()) == sorted(
        (m, n, v) for n, values in copy.distillation.items() for m, v in values.items()
    )


def noisy() -> list[list[Any]]:
    return [noise(2, seed=3), noise(2, seed=4)]


def test_history_keeps_the_newest_scores_of_each_step(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    lines = [
        {"step": 1, "loss": 0.5},
        Scores(2, {"dino": 0.1}).log_entry(),
        Scores(4, {"dino": 0.2}, {"<d>": {"dino": 0.3}}, 1.0, {1: {"clipText": 0.4}}).log_entry(),
        Scores(2, {"dino": 0.15}).log_entry(),  # a resumed run scored step 2 again
    ]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n{cut short")
    found = history(log)
    assert [(s.step, s.overall["dino"]) for s in found] == [(2, 0.15), (4, 0.2)]
    assert found[1].concepts == {"<d>": {"dino": 0.3}}
    status = found[1].status()
    assert (status.step, status.dino, status.concepts[0].concept) == (4, 0.2, "<d>")
    # An LCM student's scores by step count survive the log's JSON (string keys).
    assert found[1].distillation == {1: {"clipText": 0.4}}
    assert [(d.steps, d.clip_text) for d in status.distillation] == [(1, 0.4)]


def test_held_out_images_are_not_trained_on(tmp_path: Path) -> None:
    from finetune.trainer.data.batches import concept_examples

    images = write_images(tmp_path / "discs", 6, resolution=64)
    spec = spec_for(images, hold_out=2, metrics=["dino"])
    trained = [e.image.name for e in concept_examples(spec, [images])]
    (group,) = reference_groups(spec, [images])
    assert trained == [f"image-{i:03d}.png" for i in range(4)]
    assert [p.name for p in group.images] == ["image-004.png", "image-005.png"]
    # Nothing held out: the references are the training images themselves.
    (every,) = reference_groups(spec_for(images, metrics=["dino"]), [images])
    assert len(every.images) == 6


def test_a_hub_evaluator_with_pickled_weights_only_is_fetched_with_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_evaluators: tuple[Path, Path]
) -> None:
    """Older hub repositories hold `pytorch_model.bin` only; the base model's snapshot
    leaves pickles out, so the evaluator is fetched again with them, and only then."""
    import shutil

    from finetune.trainer.evaluation import sources
    from finetune.trainer.storage.s3 import S3Settings

    _, dino = tiny_evaluators
    bare = tmp_path / "snapshot"
    shutil.copytree(dino, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    calls: list[list[str] | None] = []

    def snapshot(
        uri: str,
        cache_dir: Path,
        ignore: list[str] | None = None,
        token_env: str = "",
        field: str = "",
        default: bool = False,
    ) -> Path:
        calls.append(ignore)
        if ignore is not None and "*.bin" not in ignore:
            (bare / "pytorch_model.bin").write_bytes(b"weights")
        return bare

    monkeypatch.setattr(sources.hub, "snapshot", snapshot)
    folder = sources.evaluator_folder(
        "hf://facebook/dino-vits16",
        "spec.validation.evaluator.dinoModel",
        "vit",
        sources.NEEDED_FILES[sources.DINO_FIELD],
        tmp_path / "cache",
        S3Settings(),
    )
    assert folder == bare.resolve()
    assert calls[0] is None  # the base model's ignore list first
    assert calls[1] is not None
    assert "*.bin" not in calls[1]
