"""Model families condition the UNet the way diffusers' own pipelines do, so what trains
is what samples: prompts, SDXL's pooled embedding and time ids, and the UNet's inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.trainer.data.encoding import Encoder
from finetune.trainer.errors import JobInputError
from finetune.trainer.families import FAMILIES, ImageGeometry, resolve_family
from finetune.trainer.methods.base import TrainedModules
from finetune.trainer.models.components import inference_pipeline, load_components

PROMPTS = ["a photo of sks disc", "a red disc on grey"]


def encoder(components: Any) -> Encoder:
    return Encoder(components, torch.device("cpu"), torch.float32, False, cache=True)


def test_the_tiny_sdxl_model_loads_as_sdxl(tiny_sdxl_model: Path) -> None:
    components = load_components(tiny_sdxl_model)
    assert components.family is FAMILIES["sdxl"]
    assert type(components.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert components.unet.config.addition_embed_type == "text_time"
    pipeline = inference_pipeline(components)
    assert type(pipeline).__name__ == "StableDiffusionXLPipeline"


@torch.no_grad()
def test_sdxl_prompts_condition_the_unet_as_its_pipeline_does(tiny_sdxl_model: Path) -> None:
    components = load_components(tiny_sdxl_model)
    conditioning = encoder(components).conditioning(PROMPTS)
    pipeline = inference_pipeline(components)
    hidden, _, pooled, _ = pipeline.encode_prompt(
        PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    # Both encoders' penultimate layers side by side (32 + 48 wide), the second's pooled.
    assert conditioning["encoder_hidden_states"].shape == (2, 77, 80)
    torch.testing.assert_close(conditioning["encoder_hidden_states"], hidden)
    torch.testing.assert_close(conditioning["text_embeds"], pooled)
    # Cached per prompt: the same again, in another order.
    again = encoder(components).conditioning(PROMPTS[::-1])
    torch.testing.assert_close(again["text_embeds"], pooled.flip(0))

    time_ids = components.family.image_inputs(
        [ImageGeometry((96, 128), (16, 0), (64, 64))], torch.device("cpu")
    )["time_ids"]
    expected = pipeline._get_add_time_ids(
        (96, 128), (16, 0), (64, 64), torch.float32, text_encoder_projection_dim=32
    )
    torch.testing.assert_close(time_ids, expected)


@torch.no_grad()
def test_sd_prompts_condition_the_unet_as_its_pipeline_does(tiny_model: Path) -> None:
    components = load_components(tiny_model)
    conditioning = encoder(components).conditioning(PROMPTS)
    assert set(conditioning) == {"encoder_hidden_states"}
    hidden, _ = inference_pipeline(components).encode_prompt(
        PROMPTS, torch.device("cpu"), 1, do_classifier_free_guidance=False
    )
    torch.testing.assert_close(conditioning["encoder_hidden_states"], hidden)
    assert components.family.image_inputs([ImageGeometry.square(64)], torch.device("cpu")) == {}


@torch.no_grad()
def test_trained_text_encoders_condition_the_unet_as_frozen_ones_do(
    tiny_sdxl_model: Path,
) -> None:
    """With trained text encoders the engine gets token ids and embeds them itself: the
    UNet must see the same conditioning as from the frozen encoders' cache."""
    components = load_components(tiny_sdxl_model)
    frozen = encoder(components)
    trained = Encoder(components, torch.device("cpu"), torch.float32, True, cache=False)
    family = components.family
    with_encoders = TrainedModules(components.unet, family=family, **components.text_encoders)
    unet_only = TrainedModules(components.unet, family=family)
    images = frozen.images([ImageGeometry.square(64)] * 2)
    latents, timesteps = torch.randn(2, 4, 32, 32), torch.tensor([10, 500])
    assert set(trained.text(PROMPTS)) == {"input_ids", "input_ids_2"}
    from_tokens = with_encoders(latents, timesteps, **trained.text(PROMPTS), **images)
    from_cache = unet_only(latents, timesteps, **frozen.text(PROMPTS), **images)
    torch.testing.assert_close(from_tokens, from_cache)


def test_families_are_resolved_from_the_folder_and_checked(
    tiny_model: Path, tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    assert resolve_family("auto", tiny_model, "m").name == "sd"
    assert resolve_family("auto", tiny_sdxl_model, "m").name == "sdxl"
    assert resolve_family("sdxl", tiny_sdxl_model, "m").name == "sdxl"

    # An explicit family serves a folder whose index names a class of its own, when the
    # folder holds the family's parts.
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyPipeline"}))
    assert resolve_family("sd", folder, "m").name == "sd"
    with pytest.raises(JobInputError, match="missing text_encoder_2, tokenizer_2"):
        resolve_family("sdxl", folder, "m")
    with pytest.raises(JobInputError, match="auto: m holds a MyPipeline"):
        resolve_family("auto", folder, "m")


def test_sdxl_is_told_each_images_original_size_and_crop(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    """A 128x96 landscape photo trained at 64 px: resized to 85x64, its middle 64 columns
    cropped (left 10), and mirrored where the flip says so (then left 21 - 10 = 11)."""
    from PIL import Image

    from finetune.trainer.data.batches import ConceptBatches
    from finetune.trainer.data.concepts import Example, ImagePreprocessor, Prepared
    from finetune.trainer.process.distributed import Rank

    Image.new("RGB", (128, 96), "red").save(tmp_path / "wide.png")
    components = load_components(tiny_sdxl_model)

    class Preparer:
        def __init__(self, flip: bool) -> None:
            self.preprocess = ImagePreprocessor(64, True, flip, seed=0)

        def prepare(self, example: Example, position: int, is_class: bool) -> Prepared:
            pixels, cacheable, geometry = self.preprocess(example.image, position)
            return Prepared(pixels, example.prompt, cacheable, geometry=geometry)

    rows = set()
    for flip in (False, True):
        batches = ConceptBatches(
            [Example(tmp_path / "wide.png", PROMPTS[0])],
            [],
            Preparer(flip),
            encoder(components),
            Rank(0, 0, 1),
            batch_size=1,
            seed=0,
        )
        for step in range(2 if not flip else 8):  # cached from the second step when it can be
            rows.add(tuple(batches.batch(step).text["time_ids"][0].tolist()))
    assert rows == {(96.0, 128.0, 0.0, 10.0, 64.0, 64.0), (96.0, 128.0, 0.0, 11.0, 64.0, 64.0)}
