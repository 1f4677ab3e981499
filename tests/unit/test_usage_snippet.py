"""The model card's loading snippet: the base model loaded with the job's own VAE, and
Python that parses whatever the job's strings hold."""

from __future__ import annotations

import ast
from typing import Any

import pytest

from finetune.api.training import TrainingSpec
from finetune.trainer.families import FAMILIES
from finetune.trainer.outputs.result import usage
from tests.support import lcm_job, lora_job


def test_a_lora_trained_with_its_own_vae_is_loaded_over_that_vae() -> None:
    spec = TrainingSpec.model_validate(
        lora_job(baseModel={"uri": "hf://org/sdxl@v1", "vaeUri": "hf://org/vae-fix@v2"})["spec"]
    )
    lines = usage(spec, "a photo", FAMILIES["sdxl"])
    assert 'vae = AutoencoderKL.from_pretrained("org/vae-fix")' in lines
    assert 'pipe = StableDiffusionXLPipeline.from_pretrained("org/sdxl", vae=vae)' in lines
    assert lines.index('pipe.load_lora_weights("path/to/this/folder")') > lines.index(
        'pipe = StableDiffusionXLPipeline.from_pretrained("org/sdxl", vae=vae)'
    )


def test_without_a_vae_of_its_own_the_base_model_loads_alone() -> None:
    for job in (lora_job(), lcm_job()):
        lines = usage(TrainingSpec.model_validate(job["spec"]), "a photo", FAMILIES["sd"])
        assert not any("AutoencoderKL" in line for line in lines)
        assert 'pipe = StableDiffusionPipeline.from_pretrained("org/model")' in lines


ODD = 'a photo of "sks" disc \\ on a café table'


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("method", ["lora", "dreambooth", "customDiffusion", "lcm", "lcmLora"])
def test_the_snippet_is_python_whatever_the_prompt_and_uris_hold(family: str, method: str) -> None:
    """Quotes and backslashes in a prompt, a model's name or a token reach the card's code
    as string literals that read back as they were written."""
    changes: dict[str, Any] = {
        "method": method,
        "baseModel": {"uri": '/models/"odd" model', "vaeUri": "/models/vae\\fix"},
    }
    if method == "customDiffusion":
        changes |= {
            "lora": None,
            "customDiffusion": {"modifierTokens": ['<new"1>']},
            "data": {"concepts": [{"instanceImages": "./a", "instancePrompt": 'a <new"1> disc'}]},
        }
    job = lcm_job(**changes) if method.startswith("lcm") else lora_job(**changes)
    lines = usage(TrainingSpec.model_validate(job["spec"]), ODD, FAMILIES[family])
    tree = ast.parse("\n".join(lines))
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert ODD in strings
    if method in ("lora", "customDiffusion", "lcmLora"):  # loaded over the base model
        assert {'/models/"odd" model', "/models/vae\\fix"} <= strings
    if method == "customDiffusion":
        assert '<new"1>' in strings or '<new"1>.safetensors' in strings
