"""LCM distillation asks the model family for the whole conditioning: the teacher's
classifier-free guidance contrasts with what the family's pipeline contrasts with, and
SDXL's pooled embedding and time ids reach the teacher, the student and the target."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.api.method_settings import LcmSpec
from finetune.trainer.data.encoding import Encoder
from finetune.trainer.errors import JobInputError
from finetune.trainer.families import FAMILIES, ImageGeometry, check_same_family
from finetune.trainer.families.sdxl import FORCE_ZEROS
from finetune.trainer.methods.lcm import Distillation
from finetune.trainer.models.components import (
    inference_pipeline,
    load_components,
    save_pipeline,
)

PROMPTS = ["a photo of sks disc", "a red disc on grey"]


def encoder(components: Any) -> Encoder:
    return Encoder(components, torch.device("cpu"), torch.float32, False, cache=False)


def without_forced_zeros(sdxl: Path, folder: Path) -> Path:
    """A copy of an SDXL model whose pipeline guides away from the empty prompt's
    encoding instead of zeros (`force_zeros_for_empty_prompt: false`)."""
    shutil.copytree(sdxl, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {FORCE_ZEROS: False}))
    return folder


@torch.no_grad()
@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl_model", "without_forced_zeros"])
def test_the_unconditional_branch_is_the_pipelines_own_negative_conditioning(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if model == "without_forced_zeros":
        folder = without_forced_zeros(request.getfixturevalue("tiny_sdxl_model"), tmp_path / "m")
    else:
        folder = request.getfixturevalue(model)
    components = load_components(folder)
    text = encoder(components)
    inputs = text.conditioning(PROMPTS)
    unconditional = components.family.unconditional(
        components.pipeline_options, text.conditioning([""]), inputs
    )

    encoded = inference_pipeline(components).encode_prompt(
        PROMPTS,
        device=torch.device("cpu"),
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
    )
    # SD returns (prompt, negative); SDXL (prompt, negative, pooled, negative pooled).
    negative = {"encoder_hidden_states": encoded[1]}
    if "text_embeds" in inputs:
        negative["text_embeds"] = encoded[3]
    assert unconditional.keys() == inputs.keys()
    for name, expected in negative.items():
        torch.testing.assert_close(unconditional[name], expected, msg=name)
        assert not torch.equal(unconditional[name], inputs[name]), name
        # SDXL base guides away from zeros; SD, and SDXL told otherwise, from "".
        assert unconditional[name].any() == (model != "tiny_sdxl_model"), name


def test_a_saved_sdxl_model_keeps_its_pipelines_settings(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    """A full fine-tune's output is the base's pipeline with new weights: its
    `model_index.json` says what the base's said, so diffusers samples it the same way."""
    from diffusers import StableDiffusionXLPipeline

    for forced, folder in (
        (True, tiny_sdxl_model),
        (False, without_forced_zeros(tiny_sdxl_model, tmp_path / "base")),
    ):
        components = load_components(folder)
        out = tmp_path / f"out-{forced}"
        save_pipeline(components, components.noise_scheduler, out)
        assert json.loads((out / "model_index.json").read_text())[FORCE_ZEROS] is forced
        loaded = StableDiffusionXLPipeline.from_pretrained(out)
        assert loaded.config[FORCE_ZEROS] is forced


def test_the_teacher_samples_as_its_own_pipeline_would(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    """The images an LCM student is compared with come from the teacher's UNet with the
    teacher folder's scheduler and pipeline settings, not the base model's."""
    from diffusers import DPMSolverMultistepScheduler

    components = load_components(tiny_sdxl_model)
    teacher_folder = without_forced_zeros(tiny_sdxl_model, tmp_path / "teacher")
    scheduler_config = teacher_folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_config.read_text())
    scheduler_config.write_text(json.dumps(config | {"timestep_spacing": "trailing"}))
    spec = type("Spec", (), {"lcm": LcmSpec(numDdimTimesteps=10)})()
    distillation = Distillation(
        spec, teacher_folder, components.unet.config, components.noise_scheduler
    )
    distillation.attach(encoder(components))

    teacher = distillation.sampling()
    pipeline = inference_pipeline(
        components,
        DPMSolverMultistepScheduler.from_config(teacher.scheduler_config),
        pipeline_options=teacher.pipeline_options,
        **teacher.modules,
    )
    assert pipeline.unet is distillation.teacher
    assert pipeline.config[FORCE_ZEROS] is False
    assert pipeline.scheduler.config.timestep_spacing == "trailing"
    # The base model's own pipeline keeps the base's settings.
    assert inference_pipeline(components).config[FORCE_ZEROS] is True
    assert components.noise_scheduler.config.timestep_spacing != "trailing"


def test_sdxl_distillation_carries_pooled_embeddings_and_time_ids_to_every_unet(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    from finetune.assets import build_sdxl_model

    components = load_components(tiny_sdxl_model)
    teacher = build_sdxl_model(tmp_path / "teacher", seed=1)
    spec = type("Spec", (), {"lcm": LcmSpec(numDdimTimesteps=10, wMin=3.0)})()
    distillation = Distillation(spec, teacher, components.unet.config, components.noise_scheduler)
    text = encoder(components)
    distillation.attach(text)
    geometry = [ImageGeometry((80, 96), (8, 16), (64, 64)), ImageGeometry.square(64)]
    inputs = {**text.conditioning(PROMPTS), **text.images(geometry)}

    seen: dict[str, Any] = {}

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.update(kwargs)

    distillation.teacher.register_forward_pre_hook(record, with_kwargs=True)
    given: list[dict[str, torch.Tensor]] = []
    family, unet = components.family, components.unet

    def run(x: torch.Tensor, t: torch.Tensor, batch: Any, cond: Any) -> torch.Tensor:
        given.append(dict(batch))
        return unet(x, t, **family.unet_inputs(batch)).sample  # type: ignore[no-any-return]

    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        loss = distillation.loss(latents, inputs, run, run, None)
    assert torch.isfinite(loss)

    added = seen["added_cond_kwargs"]
    time_ids = inputs["time_ids"]
    assert time_ids.tolist() == [[80, 96, 8, 16, 64, 64], [64, 64, 0, 0, 64, 64]]
    # Conditional half, then the unconditional half: zero prompt and pooled embeddings
    # (as SDXL's pipeline guides), the same images' time ids.
    torch.testing.assert_close(added["time_ids"], torch.cat([time_ids, time_ids]))
    torch.testing.assert_close(added["text_embeds"][:2], inputs["text_embeds"])
    assert added["text_embeds"].shape == (4, inputs["text_embeds"].shape[1])
    assert not added["text_embeds"][2:].any()
    torch.testing.assert_close(seen["encoder_hidden_states"][:2], inputs["encoder_hidden_states"])
    assert not seen["encoder_hidden_states"][2:].any()
    # The student and the target receive the batch's pooled embeddings and time ids.
    assert len(given) == 2
    for batch in given:
        torch.testing.assert_close(batch["time_ids"], time_ids)
        torch.testing.assert_close(batch["text_embeds"], inputs["text_embeds"])


def test_a_teacher_of_another_family_is_refused_naming_the_field(
    tiny_model: Path, tiny_sdxl_model: Path
) -> None:
    field = "spec.lcm.teacherModel.uri"
    with pytest.raises(JobInputError) as refused:
        check_same_family(FAMILIES["sdxl"], tiny_model, "s3://models/sd", field)
    message = str(refused.value)
    assert message.startswith(field)
    for fragment in ("s3://models/sd", "StableDiffusionPipeline (sd)", "(sdxl)"):
        assert fragment in message
    check_same_family(FAMILIES["sdxl"], tiny_sdxl_model, "s3://models/sdxl", field)
