"""Custom Diffusion on Stable Diffusion XL (the tiny random model of `finetune.assets`),
two concepts, 2 processes under DeepSpeed on CPU: the model card's own loading code puts
the tokens into both text encoders and the processors into the UNet, and the images
change; in both embedding tables only the new tokens' rows trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.assets import write_images
from tests.trainer.jobs import finetune_run, job_file, render, train_log

pytestmark = pytest.mark.slow

WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
TOKENS = ["<new1>", "<new2>"]
INITIALIZERS = ["k", "p"]
PROMPT = "photo of a <new1> disc beside a <new2> disc"
ENCODERS = {
    "text_encoder": ("tokenizer", "clip_l", 32),
    "text_encoder_2": ("tokenizer_2", "clip_g", 48),
}


def card_pipeline(card: str, out: Path) -> Any:
    """The pipeline the model card's "How to use" code builds from `out`, run as written
    up to its final image line."""
    code = card.split("## How to use", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    lines = [line for line in code.strip().splitlines() if not line.startswith("image = ")]
    namespace: dict[str, Any] = {}
    exec("\n".join(lines).replace("path/to/this/folder", str(out)), namespace)
    pipeline = namespace["pipe"]
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_sdxl_custom_diffusion_loads_through_the_cards_code_into_both_text_encoders(
    tmp_path: Path,
    tiny_sdxl_model: Path,
    disc_images: Path,
    tiny_evaluators: tuple[Path, Path],
) -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    clip, dino = tiny_evaluators
    others = write_images(tmp_path / "others", 4, resolution=64, seed=9)
    concepts = [
        {"instanceImages": str(images), "instancePrompt": f"photo of a {token} disc"}
        for images, token in ((disc_images, TOKENS[0]), (others, TOKENS[1]))
    ]
    job = job_file(
        tmp_path,
        tiny_sdxl_model,
        disc_images,
        method="customDiffusion",
        data={"concepts": concepts},
        customDiffusion={
            "modifierTokens": TOKENS,
            "initializerTokens": INITIALIZERS,
            "freezeModel": "crossattn",
        },
        training={"learningRate": 1e-3, "maxSteps": 4},
        checkpointing={"everyNSteps": 4},
        validation={
            "prompts": [PROMPT, "photo of a <new1> disc"],
            "everyNSteps": 4,
            "imagesPerPrompt": 1,
            "inferenceSteps": 2,
            "metrics": ["clipText", "dino"],
            "evaluator": {"clipModel": str(clip), "dinoModel": str(dino)},
        },
    )
    finetune_run(job)
    out = tmp_path / "out"
    log = train_log(out)
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]

    # Each concept is scored apart, by its token, from the SDXL pipeline's samples.
    (scored,) = [e for e in log if "validation" in e]
    assert set(scored["concepts"]) == set(TOKENS)
    assert all(set(scores) == {"clipText", "dino"} for scores in scored["concepts"].values())

    # One file per token in diffusers' SDXL layout: a row for each text encoder.
    for token in TOKENS:
        rows = load_file(out / f"{token}.safetensors")
        assert {k: tuple(v.shape) for k, v in rows.items()} == {
            "clip_l": (1, 32),
            "clip_g": (1, 48),
        }

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    base.set_progress_bar_config(disable=True)
    before = render(base, PROMPT, steps=3, seed=5)
    card = (out / "README.md").read_text()
    assert "stable-diffusion-xl" in card
    pipeline = card_pipeline(card, out)
    assert type(pipeline) is StableDiffusionXLPipeline

    for encoder_name, (tokenizer_name, _, width) in ENCODERS.items():
        tokenizer = getattr(pipeline, tokenizer_name)
        old = getattr(base, encoder_name).get_input_embeddings().weight.detach()
        new = getattr(pipeline, encoder_name).get_input_embeddings().weight.detach()
        assert new.shape == (old.shape[0] + 2, width)
        torch.testing.assert_close(new[: old.shape[0]], old)  # no other row changed
        new_ids = tokenizer.convert_tokens_to_ids(TOKENS)
        initial = [tokenizer.encode(w, add_special_tokens=False)[0] for w in INITIALIZERS]
        for new_id, initializer in zip(new_ids, initial, strict=True):
            moved = (new[new_id] - old[initializer]).abs().max()
            assert 0 < moved < 0.1, f"{encoder_name}: a token did not train, or went astray"

    # The processors: every cross-attention layer at both encoders' width, query and
    # output included (`crossattn`).
    state = load_file(out / WEIGHTS)
    cross = {name for name in pipeline.unet.attn_processors if ".attn2." in name}
    assert {k.rsplit(".", 2)[0] for k in state if "to_q_custom_diffusion" in k} == cross
    assert all(v.shape[1] == 32 + 48 for k, v in state.items() if "to_k_custom_diffusion" in k)
    assert all(
        isinstance(p, CustomDiffusionAttnProcessor) for p in pipeline.unet.attn_processors.values()
    )
    after = render(pipeline, PROMPT, steps=3, seed=5)
    assert np.abs(after - before).mean() > 1e-4

    # What DeepSpeed trained (its checkpoint keeps trainable weights only): in each text
    # encoder the new tokens' rows and nothing else; in the UNet, the processors' copies.
    checkpoint = torch.load(
        out / "checkpoints" / "step-00000004" / "mp_rank_00_model_states.pt", weights_only=False
    )
    trained = set(checkpoint["module"])
    assert {k for k in trained if k.startswith("text_encoder")} == {
        "text_encoder.embeddings.token_embedding.rows",
        "text_encoder_2.text_model.embeddings.token_embedding.rows",
    }
    assert all("custom_diffusion" in k for k in trained if k.startswith("unet."))
