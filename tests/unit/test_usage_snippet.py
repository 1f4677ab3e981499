"""The model card's loading snippet: the base model loaded with the job's own VAE."""

from __future__ import annotations

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
