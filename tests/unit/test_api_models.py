"""The FineTuneJob models: defaults, cross-field rules, and errors naming fields."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from finetune.api import FineTuneJob, TrainingSpec
from finetune.api.errors import problems_from
from tests.support import lcm_job, lora_job


def problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.model_validate(document)
    return [str(p) for p in problems_from(caught.value)]


def test_minimal_lora_job_gets_the_method_defaults() -> None:
    spec = FineTuneJob.model_validate(lora_job()).spec
    assert spec.training.learning_rate == 1e-4
    assert spec.lora is not None
    assert spec.lora.rank == 4
    assert spec.lora.alpha == 4.0
    assert spec.lora.target_modules == ["to_k", "to_q", "to_v", "to_out.0"]
    assert spec.deepspeed.zero_stage is None, "the trainer chooses"
    assert spec.validation.inference_steps == 25
    assert spec.checkpointing.every_n_steps == 500


def test_lcm_lora_defaults_differ_from_lora() -> None:
    spec = FineTuneJob.model_validate(lcm_job()).spec
    assert spec.lora is not None
    assert spec.lora.rank == 64
    assert spec.lora.target_modules is not None
    assert {"to_k", "conv1", "time_emb_proj", "ff.net.2"} <= set(spec.lora.target_modules)
    assert spec.lcm is not None
    assert spec.lcm.w_min == 3.0
    assert spec.validation.inference_steps == 4
    assert spec.validation.guidance_scale == 1.0


def test_user_values_win_over_method_defaults() -> None:
    spec = FineTuneJob.model_validate(
        lora_job(training={"learningRate": 3e-4, "maxSteps": 200}, lora={"rank": 16})
    ).spec
    assert spec.training.learning_rate == 3e-4
    assert spec.lora is not None
    assert (spec.lora.rank, spec.lora.alpha) == (16, 16.0)
    assert spec.checkpointing.every_n_steps == 200  # default capped at maxSteps


def test_training_spec_is_the_job_spec_without_cluster_fields() -> None:
    job = FineTuneJob.model_validate(
        lora_job(resources={"nodes": 4}, runPolicy={"backoffLimit": 1})
    )
    training = job.spec.training_spec()
    assert type(training) is TrainingSpec
    dumped = training.model_dump(by_alias=True, exclude_none=True)
    assert "resources" not in dumped
    assert "runPolicy" not in dumped
    full = job.spec.model_dump(by_alias=True, exclude_none=True)
    assert {k: full[k] for k in dumped} == dumped


def test_yaml_uses_camel_case_and_python_snake_case() -> None:
    job = FineTuneJob.model_validate(lora_job(training={"gradientAccumulationSteps": 4}))
    assert job.spec.training.gradient_accumulation_steps == 4
    assert job.to_manifest()["spec"]["training"]["gradientAccumulationSteps"] == 4


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            lora_job(method="customDiffusion", lora=None),
            "spec.customDiffusion.modifierTokens: at least one token is needed for customDiffusion",
        ),
        (
            lcm_job(lcm={"teacherModel": None}),
            "spec.lcm.teacherModel: a teacher model is needed for lcmLora",
        ),
        (
            lcm_job(method="lcm", lcm=None),
            "spec.lcm.teacherModel: a teacher model is needed for lcm",
        ),
        (
            lora_job(training={"priorPreservation": True}),
            "spec.data.concepts[0].classPrompt: is needed when training.priorPreservation is on",
        ),
        (
            lora_job(training={"maxSteps": 100}, checkpointing={"everyNSteps": 200}),
            "spec.checkpointing.everyNSteps: 200 is larger than training.maxSteps (100)",
        ),
        (
            lora_job(method="dreambooth", output={"formats": ["kohya"]}),
            "spec.output.formats: kohya is a LoRA format; dreambooth does not train LoRA",
        ),
        (
            lora_job(method="dreambooth", lora={"rank": 8}),
            "spec.lora: is only used when method is lcmLora or lora, not dreambooth",
        ),
        (
            lora_job(data={"concepts": []}),
            "spec.data.concepts: at least one concept is needed for lora",
        ),
        (
            lcm_job(data={"dataset": None}),
            "spec.data.dataset: an image-caption dataset is needed for lcmLora",
        ),
        (
            lora_job(
                method="customDiffusion",
                lora=None,
                customDiffusion={"modifierTokens": ["<a>", "<b>"], "initializerTokens": ["ktn"]},
            ),
            "spec.customDiffusion.initializerTokens: needs one token per modifier token (2), got 1",
        ),
        (
            lora_job(
                method="customDiffusion", lora=None, customDiffusion={"modifierTokens": ["<new1>"]}
            ),
            "spec.data.concepts[0].instancePrompt: must contain one of customDiffusion.modifierTokens",
        ),
        (
            lcm_job(data={"buckets": True}),
            "spec.data.buckets: buckets apply to concept images, not to lcmLora's streamed "
            "data.dataset; leave data.buckets unset or false",
        ),
        (
            lora_job(
                method="customDiffusion",
                lora=None,
                customDiffusion={"modifierTokens": ["<new1>"]},
                data={
                    "buckets": True,
                    "concepts": [{"instanceImages": "./a", "instancePrompt": "a <new1> cat"}],
                },
            ),
            "spec.data.buckets: customDiffusion.augmentation makes square images; set one of "
            "them to false",
        ),
        (
            lcm_job(method="lcm", lcm={"wMin": 20.0, "wMax": 10.0}),
            "spec.lcm.wMin: 20.0 is larger than lcm.wMax (10.0)",
        ),
        (
            lcm_job(training={"trainTextEncoder": True}),
            "spec.training.trainTextEncoder: is not supported by lcmLora",
        ),
        (
            lora_job(training={"ema": {"enabled": True}}),
            "spec.training.ema.enabled: EMA applies to full fine-tunes (dreambooth, lcm), not lora",
        ),
        (
            lora_job(deepspeed={"zeroStage": 2, "offloadParameters": True}),
            "spec.deepspeed.offloadParameters: needs ZeRO stage 3, which the trainer does not support yet",
        ),
        (
            lora_job(deepspeed={"config": {"zero_optimization": {"stage": 3}}}),
            "spec.deepspeed.config.zero_optimization.stage: is set by the trainer; use deepspeed.zeroStage",
        ),
        (
            lora_job(deepspeed={"config": {"bf16": {"enabled": True}}}),
            "spec.deepspeed.config.bf16: is set by the trainer; use training.mixedPrecision",
        ),
        (
            lora_job(deepspeed={"config": {"torch_autocast": {"enabled": True}}}),
            "spec.deepspeed.config.torch_autocast: is set by the trainer; use training.mixedPrecision",
        ),
        (
            lora_job(deepspeed={"config": {"optimizer": {"type": "Lamb"}}}),
            "spec.deepspeed.config.optimizer: is set by the trainer; use training.optimizer "
            "and training.learningRate",
        ),
        (
            lora_job(deepspeed={"config": {"scheduler": {"type": "WarmupLR"}}}),
            "spec.deepspeed.config.scheduler: is set by the trainer; use training.lrScheduler",
        ),
        (
            lora_job(validation={"metrics": ["clipText"]}),
            "spec.validation.metrics: needs validation.prompts: the metrics score their samples",
        ),
        (
            lora_job(validation={"prompts": ["a sks dog"], "metrics": ["dino", "dino"]}),
            "spec.validation.metrics: metrics must be distinct",
        ),
        (
            lcm_job(validation={"prompts": ["a cat"], "metrics": ["clipText", "dino"]}),
            "spec.validation.metrics: dino compares samples with the instance images of "
            "data.concepts, which lcmLora does not have; clipText and clipImage (to the "
            "teacher's images) apply",
        ),
        (
            lora_job(
                method="customDiffusion",
                lora=None,
                customDiffusion={"modifierTokens": ["<new1>"]},
                data={"concepts": [{"instanceImages": "./a", "instancePrompt": "a <new1> cat"}]},
                validation={"prompts": ["a cat"], "metrics": ["clipImage", "dino"]},
            ),
            "spec.validation.prompts: no prompt contains one of customDiffusion.modifierTokens, "
            "so clipImage and dino have no concept to compare samples with",
        ),
    ],
)
def test_cross_field_rules_name_the_field(document: dict[str, Any], expected: str) -> None:
    assert expected in problems(document)


def test_all_broken_rules_are_reported_together() -> None:
    found = problems(
        lora_job(
            method="dreambooth",
            lora={"rank": 4},
            output={"formats": ["kohya"]},
            training={"maxSteps": 10},
            checkpointing={"everyNSteps": 20},
        )
    )
    assert [p.split(":")[0] for p in found] == [
        "spec.lora",
        "spec.checkpointing.everyNSteps",
        "spec.output.formats",
    ]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (lora_job(training={"learningRat": 1e-4}), "spec.training.learningRat: unknown field"),
        (
            lora_job(training={"learningRate": -1}),
            "spec.training.learningRate: must be greater than 0",
        ),
        (
            lora_job(deepspeed={"zeroStage": 3}),  # not supported by the trainer yet
            "spec.deepspeed.zeroStage: must be less than or equal to 2",
        ),
        (
            lora_job(method="textualInversion"),
            "spec.method: must be 'dreambooth', 'lora', 'customDiffusion', 'lcm' or 'lcmLora'",
        ),
        (lora_job(data={"resolution": 500}), "spec.data.resolution: must be a multiple of 8"),
        (
            lora_job(baseModel={"uri": "gs://bucket/model"}),
            "spec.baseModel.uri: unsupported scheme gs:// in 'gs://bucket/model'; use hf://, s3:// or a local path",
        ),
        (
            lora_job(baseModel={"uri": "hf://just-a-name"}),
            "spec.baseModel.uri: 'hf://just-a-name' is not of the form hf://org/name[@revision]",
        ),
        (
            lora_job(resources={"memory": "lots"}),
            "spec.resources.memory: 'lots' is not a Kubernetes quantity such as 8, 500m or 32Gi",
        ),
        (
            {**lora_job(), "metadata": {"name": "Dog_LoRA"}},
            "metadata.name: 'Dog_LoRA' is not lower-case letters, digits and '-', starting with a letter",
        ),
        ({**lora_job(), "kind": "Job"}, "kind: must be 'FineTuneJob', got 'Job'"),
        (
            {**lora_job(), "apiVersion": "finetune.dev/v1"},
            "apiVersion: must be 'finetune.dev/v1alpha1', got 'finetune.dev/v1'",
        ),
        (lora_job(output=None), "spec.output: required field is missing"),
        (
            lora_job(
                method="customDiffusion",
                lora=None,
                customDiffusion={"modifierTokens": ["../x"]},
                data={"concepts": [{"instanceImages": "./a", "instancePrompt": "a ../x cat"}]},
            ),
            r"spec.customDiffusion.modifierTokens[0]: '../x' does not match the pattern ^[^\s/\\]+$",
        ),
        (
            lora_job(
                data={"concepts": [{"instanceImages": "./a", "instancePrompt": "a", "holdOut": -1}]}
            ),
            "spec.data.concepts[0].holdOut: must be greater than or equal to 0",
        ),
        (
            lora_job(validation={"prompts": ["a"], "metrics": ["fid"]}),
            "spec.validation.metrics[0]: must be 'clipText', 'clipImage' or 'dino'",
        ),
        (
            lora_job(output={"uri": "hf://me/disc-lora"}),
            "spec.output.uri: 'hf://me/disc-lora': hf:// names a model on the Hugging Face Hub; "
            "this field takes s3://bucket/prefix or a local path",
        ),
        (
            lora_job(
                data={"concepts": [{"instanceImages": "hf://me/discs", "instancePrompt": "a"}]}
            ),
            "spec.data.concepts[0].instanceImages: 'hf://me/discs': hf:// names a model on the "
            "Hugging Face Hub; this field takes s3://bucket/prefix or a local path",
        ),
        (
            lora_job(training={"maxGradNorm": float("inf")}),
            "spec.training.maxGradNorm: must be a finite number",
        ),
        (
            lora_job(validation={"prompts": ["a sks disc", "  "]}),
            "spec.validation.prompts[1]: must not be blank",
        ),
        (
            lora_job(output={"uri": "gs://b/out"}),
            "spec.output.uri: unsupported scheme gs:// in 'gs://b/out'; use s3:// or a local path",
        ),
        (
            lora_job(validation={"evaluator": {"dinoModel": "gs://b/dino"}}),
            "spec.validation.evaluator.dinoModel: unsupported scheme gs:// in 'gs://b/dino'; use hf://, s3:// or a local path",
        ),
    ],
)
def test_field_errors_name_the_field(document: dict[str, Any], expected: str) -> None:
    assert expected in problems(document)


def test_metrics_are_off_by_default_and_lcm_may_score_prompts() -> None:
    spec = FineTuneJob.model_validate(lora_job()).spec
    assert spec.validation.metrics == []
    assert spec.validation.evaluator.clip_model == "hf://openai/clip-vit-large-patch14"
    assert spec.validation.evaluator.dino_model == "hf://facebook/dino-vits16"
    assert spec.data.concepts[0].hold_out == 0
    lcm = FineTuneJob.model_validate(
        lcm_job(validation={"prompts": ["a cat"], "metrics": ["clipText"]})
    ).spec
    assert lcm.validation.metrics == ["clipText"]


def test_lcm_scores_its_student_against_the_teacher_at_one_to_eight_steps() -> None:
    metrics = {"prompts": ["a cat"], "metrics": ["clipText", "clipImage"]}
    lcm_lora = FineTuneJob.model_validate(lcm_job(validation=metrics)).spec.validation
    assert lcm_lora.distillation is not None
    assert lcm_lora.distillation.steps == [1, 2, 4, 8]
    assert lcm_lora.distillation.teacher_inference_steps == 25
    assert lcm_lora.distillation.teacher_guidance_scale == 7.5  # its student takes none
    # lcm's student embeds the validation's guidance scale: the teacher samples at it.
    lcm = FineTuneJob.model_validate(lcm_job(method="lcm", lora=None, validation=metrics)).spec
    assert lcm.validation.distillation is not None
    assert lcm.validation.distillation.teacher_guidance_scale == lcm.validation.guidance_scale
    # Only the step counts the student's LCMScheduler can take.
    few = lcm_job(lcm={"numDdimTimesteps": 4}, validation=metrics)
    distillation = FineTuneJob.model_validate(few).spec.validation.distillation
    assert distillation is not None
    assert distillation.steps == [1, 2, 4]
    # Without metrics nothing is compared; keepBest may choose by clipImage.
    assert FineTuneJob.model_validate(lcm_job()).spec.validation.distillation is None
    FineTuneJob.model_validate(
        lcm_job(validation=metrics, checkpointing={"keepBest": {"metric": "clipImage"}})
    )


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            lcm_job(
                validation={
                    "prompts": ["a cat"],
                    "metrics": ["clipImage"],
                    "distillation": {"steps": [4, 2]},
                }
            ),
            "spec.validation.distillation.steps: must be ascending and distinct, got [4, 2]",
        ),
        (
            lcm_job(
                lcm={"numDdimTimesteps": 10},
                validation={
                    "prompts": ["a cat"],
                    "metrics": ["clipText"],
                    "distillation": {"steps": [1, 16]},
                },
            ),
            "spec.validation.distillation.steps: 16 is more than lcm.numDdimTimesteps (10), "
            "the most steps the student's LCMScheduler can take",
        ),
        (
            lora_job(
                validation={
                    "prompts": ["a sks dog"],
                    "metrics": ["clipText"],
                    "distillation": {"steps": [1]},
                }
            ),
            "spec.validation.distillation: is only used when method is lcm or lcmLora, not lora",
        ),
        (
            lcm_job(validation={"prompts": ["a cat"], "distillation": {"steps": [1]}}),
            "spec.validation.distillation: scores with validation.metrics: add clipText or "
            "clipImage to them",
        ),
        (
            lcm_job(validation={"prompts": ["a cat"], "distillation": {"steps": [0]}}),
            "spec.validation.distillation.steps[0]: must be greater than or equal to 1",
        ),
    ],
)
def test_a_teacher_comparison_it_cannot_make_is_refused(
    document: dict[str, Any], expected: str
) -> None:
    assert expected in problems(document)


def test_api_and_cli_import_without_torch() -> None:
    """The operator image has no torch: the API and the CLI must not need it."""
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers', 'deepspeed', 'accelerate', 'peft'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "import finetune.api, finetune.cli, finetune.api.crd, finetune.api.loading\n"
        "raise SystemExit(finetune.cli.main(['crd', '--output', '/dev/null']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
