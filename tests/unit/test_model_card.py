"""The model card as a reader sees it rendered (CommonMark with GFM tables): prompts and
tokens kept whole, the metrics scored and what they compare, whose weights these are
and why the run ended early."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from finetune.api.selection import EarlyStopping
from finetune.api.training import TrainingSpec
from finetune.trainer.evaluation.scores import Scores
from finetune.trainer.evaluation.selection import Chosen, Stall
from finetune.trainer.families import FAMILIES
from finetune.trainer.outputs.finish import chosen
from finetune.trainer.outputs.result import code, model_card
from tests.support import lcm_job, lora_job

PROMPT = "a photo of sks disc | with `pipe`"


def card(spec: TrainingSpec, steps: int = 40, **extra: Any) -> str:
    return model_card(spec, "disc", steps, 1.0, None, Path("/work"), family=FAMILIES["sd"], **extra)


def rendered(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(markdown)


def codes(html: str) -> list[str]:
    return [part.split("</code>")[0] for part in html.split("<code>")[1:]]


def test_prompts_with_backticks_pipes_and_line_breaks_stay_one_code_span_each() -> None:
    spec = TrainingSpec.model_validate(
        lora_job(
            data={"concepts": [{"instanceImages": "./d", "instancePrompt": PROMPT}]},
            validation={"prompts": [PROMPT, "line one\nline two sks", "`edge`"]},
        )["spec"]
    )
    html = rendered(card(spec))
    training = html.split("<h2>Training prompts</h2>")[1].split("<h2>")[0]
    validation = html.split("<h2>Validation prompts</h2>")[1].split("<h2>")[0]
    assert training.count("<li>") == 1
    assert validation.count("<li>") == 3
    assert codes(training) == [PROMPT]
    assert codes(validation) == [PROMPT, "line one⏎line two sks", "`edge`"]
    assert code("`") == "`` ` ``"


def test_custom_diffusion_concepts_and_files_are_shown_not_taken_for_html() -> None:
    spec = TrainingSpec.model_validate(
        lora_job(
            method="customDiffusion",
            lora=None,
            customDiffusion={"modifierTokens": ["<new1>", "<a|b>"]},
            data={
                "concepts": [
                    {"instanceImages": "./a", "instancePrompt": "a <new1> disc"},
                    {"instanceImages": "./b", "instancePrompt": "a <a|b> cup"},
                ]
            },
            validation={"prompts": ["a <new1> disc"], "metrics": ["clipText"]},
        )["spec"]
    )
    scores = [
        Scores(10, {"clipText": 0.3}, {"<new1>": {"clipText": 0.31}, "<a|b>": {"clipText": 0.29}})
    ]
    files = [("<new1>.safetensors", 12, "ab" * 32)]
    html = rendered(card(spec, scores=scores, files=files))
    metrics = html.split("<h2>Validation metrics</h2>")[1].split("<h2>")[0]
    rows = [row.split("<td")[1:] for row in metrics.split("<tr>")[2:]]
    assert [len(row) for row in rows] == [3, 3, 3]  # step, concept, clipText: none split
    assert "<code>&lt;new1&gt;</code>" in rows[1][1]
    assert "<code>&lt;a|b&gt;</code>" in rows[2][1]
    assert "<code>&lt;new1&gt;.safetensors</code>" in html.split("<h2>Files</h2>")[1]


def test_the_metrics_sentence_names_only_the_metrics_scored() -> None:
    lora = TrainingSpec.model_validate(
        lora_job(validation={"prompts": ["a sks disc"], "metrics": ["clipText"]})["spec"]
    )
    text = card(lora, scores=[Scores(10, {"clipText": 0.3})])
    assert "Cosine similarities of each validation's samples: `clipText` (CLIP) with their " in text
    assert "`dino`" not in text
    assert "`clipImage`" not in text

    lcm = TrainingSpec.model_validate(
        lcm_job(
            validation={
                "prompts": ["a sks disc"],
                "metrics": ["clipText", "clipImage"],
                "distillation": {},
            }
        )["spec"]
    )
    text = card(lcm, scores=[Scores(10, {"clipText": 0.3, "clipImage": 0.8})])
    assert (
        "`clipText` (CLIP) with their prompts and `clipImage` (CLIP) with the teacher's image "
        "of the same prompt and seed." in text
    )
    assert "dino" not in text.split("## Validation metrics")[1]


def test_the_card_names_the_identifier_clip_text_leaves_out() -> None:
    concept = {"instanceImages": "/d", "instancePrompt": "a sks disc", "classPrompt": "a disc"}
    spec = TrainingSpec.model_validate(
        lora_job(
            data={"concepts": [concept]},
            validation={"prompts": ["a sks disc"], "metrics": ["clipText"]},
        )["spec"]
    )
    text = card(spec, scores=[Scores(10, {"clipText": 0.3})])
    assert "`clipText` (CLIP) with their prompts (without `sks`)." in text


def keep_best_spec(**training: Any) -> TrainingSpec:
    return TrainingSpec.model_validate(
        lora_job(
            training={"maxSteps": 60, **training},
            validation={"prompts": ["a sks disc"], "metrics": ["dino"], "everyNSteps": 10},
            checkpointing={"keepBest": {"metric": "dino"}},
            output={"uri": "/out", "from": "best"},
        )["spec"]
    )


def test_an_early_stop_is_told_with_the_chosen_steps_own_loss() -> None:
    rule = {"metric": "dino", "patience": 2}
    spec = keep_best_spec(earlyStopping=rule)
    best = Scores(10, {"dino": 0.6})
    history = [best, Scores(20, {"dino": 0.5}), Scores(30, {"dino": 0.55})]
    text = card(
        spec,
        steps=30,
        scores=history,
        best=Chosen(best, 1.1141),
        stall=Stall(best, 2, 30),
    )
    assert EarlyStopping.model_validate(rule).min_delta == 0
    assert (
        "Training stopped early after step 30 of 60 (`training.earlyStopping`): `dino` had "
        "not improved by more than 0 for 2 validations (patience 2); its best, max 0.6000, "
        "was at step 10." in text
    )
    assert (
        "These are the weights of step 10, the best validation by `dino` (max 0.6000; "
        "`output.from: best`). Step 10's training loss was 1.1141." in text
    )
    assert "Training stopped early" not in card(spec, steps=60, scores=history)


def test_when_the_best_checkpoint_is_gone_the_card_and_done_line_say_whose_weights() -> None:
    spec = keep_best_spec()
    kept, gone = Scores(10, {"dino": 0.6}), Scores(20, {"dino": 0.7})
    result = Chosen(kept, 1.2, gone)
    text = card(spec, scores=[kept, gone], best=result)
    assert (
        "These are the weights of step 10, the best validation by `dino` among those whose "
        "weights were left (max 0.6000; `output.from: best`)." in text
    )
    assert "The best, step 20 (0.7000), has no checkpoint left" in text
    assert chosen(result) == (
        " (the weights of step 10, the best validation whose weights were left; step 20's, "
        "the best, were gone)"
    )
    assert chosen(Chosen(gone)) == " (the weights of step 20, the best validation)"
