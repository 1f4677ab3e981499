"""LCM's formulas, checked against what diffusers' pipelines and schedulers use."""

from __future__ import annotations

import pytest
import torch

from finetune.trainer.methods.lcm import boundary_scalings, guidance_embedding


@pytest.mark.parametrize("dim", [256, 255])
def test_guidance_embedding_is_what_the_diffusers_pipelines_feed_the_unet(dim: int) -> None:
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 1.5, 7.0])
    # The pipeline method does not use `self`.
    expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, dim)  # type: ignore[arg-type]
    torch.testing.assert_close(guidance_embedding(w, dim), expected)


def test_the_consistency_function_is_the_identity_at_timestep_zero() -> None:
    c_skip, c_out = boundary_scalings(torch.tensor([0, 500]), scaling=10.0)
    assert c_skip.flatten().tolist()[0] == 1.0
    assert c_out.flatten().tolist()[0] == 0.0
    assert c_skip.flatten()[1] < 1e-3
    assert c_out.flatten()[1] > 0.99
