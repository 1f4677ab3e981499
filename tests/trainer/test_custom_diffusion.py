"""Custom Diffusion with two concepts, 2 processes under DeepSpeed ZeRO-2 on CPU: the
tokens and attention weights load through diffusers' public loaders, and in the
text encoder only the new tokens' rows moved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.assets import write_images
from tests.trainer.jobs import finetune_run, job_file, render, train_log

pytestmark = pytest.mark.slow

WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
PROMPT = "photo of a <new1> disc beside a <new2> disc"


def test_two_concepts_train_only_their_tokens_and_cross_attention(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    others = write_images(tmp_path / "others", 4, resolution=64, seed=9)
    concepts = [
        {
            "instanceImages": str(images),
            "instancePrompt": f"photo of a {token} disc",
            "classPrompt": "photo of a disc",
            "classImages": {"count": 2},
        }
        for images, token in ((disc_images, "<new1>"), (others, "<new2>"))
    ]
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        method="customDiffusion",
        data={"concepts": concepts},
        customDiffusion={"modifierTokens": ["<new1>", "<new2>"], "initializerTokens": ["k", "p"]},
        training={"priorPreservation": True, "learningRate": 1e-3, "maxSteps": 6},
        validation={
            "prompts": [PROMPT],
            "everyNSteps": 6,
            "imagesPerPrompt": 1,
            "inferenceSteps": 2,
        },
    )
    finetune_run(job)
    out = tmp_path / "out"
    assert [e["step"] for e in train_log(out)] == list(range(1, 7))
    assert (out / "samples" / "step-00000006" / "grid.png").exists()
    for index in (0, 1):
        assert len(list((out / "class_images" / f"concept-{index}").glob("*.png"))) == 2

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    table = pipeline.text_encoder.get_input_embeddings().weight.detach().clone()
    initializers = [pipeline.tokenizer.encode(w, add_special_tokens=False)[0] for w in "kp"]

    # The tokens: one file each, loaded with the textual-inversion loader.
    for token in ("<new1>", "<new2>"):
        pipeline.load_textual_inversion(out, weight_name=f"{token}.safetensors")
    trained = pipeline.text_encoder.get_input_embeddings().weight.detach()
    assert trained.shape[0] == table.shape[0] + 2
    new_ids = pipeline.tokenizer.convert_tokens_to_ids(["<new1>", "<new2>"])
    for new_id, initializer in zip(new_ids, initializers, strict=True):
        assert not torch.allclose(trained[new_id], table[initializer]), "a token did not train"
        # They started from their initializers and moved a little, not anywhere.
        assert (trained[new_id] - table[initializer]).abs().max() < 0.1

    # The attention weights: every cross-attention layer, loaded by load_attn_procs.
    state = load_file(out / WEIGHTS)
    cross = [name for name in pipeline.unet.attn_processors if ".attn2." in name]
    assert {
        k.rsplit(".processor.", 1)[0] + ".processor" for k in state if "custom_diffusion" in k
    } == set(cross)
    assert not any("to_q_custom_diffusion" in k for k in state), "crossattnKV trains key/value only"
    before = render(pipeline, PROMPT, steps=3, seed=5)
    # diffusers 0.42 installs the processors only when given the pipeline
    # (huggingface/diffusers#9320); without `_pipeline` the call changes nothing.
    pipeline.unet.load_attn_procs(out, weight_name=WEIGHTS, _pipeline=pipeline)
    assert all(
        isinstance(p, CustomDiffusionAttnProcessor) for p in pipeline.unet.attn_processors.values()
    )
    after = render(pipeline, PROMPT, steps=3, seed=5)
    assert np.abs(after - before).mean() > 1e-4

    # What DeepSpeed trained (the checkpoint keeps trainable weights only): in the text
    # encoder, the new tokens' rows and nothing else; in the UNet, the processors' copies.
    checkpoint = torch.load(
        out / "checkpoints" / "step-00000006" / "mp_rank_00_model_states.pt", weights_only=False
    )
    trained_keys = set(checkpoint["module"])
    assert {k for k in trained_keys if k.startswith("text_encoder.")} == {
        "text_encoder.embeddings.token_embedding.rows"
    }
    assert all("custom_diffusion" in k for k in trained_keys if k.startswith("unet."))

    card = (out / "README.md").read_text()
    assert "load_attn_procs" in card
    assert "load_textual_inversion" in card
