"""Custom Diffusion's parts that can be checked without training: modifier tokens, cross-attention copies, scale augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from finetune.assets import write_images, write_tokenizer
from finetune.trainer.data.concepts import Example
from finetune.trainer.errors import JobInputError
from finetune.trainer.methods.custom_diffusion import (
    LARGE_PREFIXES,
    SMALL_PREFIXES,
    ModifierTokenEmbedding,
    ScaleAugmentation,
    add_modifier_tokens,
)


def test_modifier_token_rows_are_the_only_trainable_embedding_rows() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(10, 4).requires_grad_(False)
    spliced = ModifierTokenEmbedding(base, first_new_id=10, initial_rows=base.weight[[3, 5]])
    ids = torch.tensor([[1, 10, 2, 11]])
    out = spliced(ids)
    torch.testing.assert_close(out[0, 0], base.weight[1])
    torch.testing.assert_close(out[0, 1], base.weight[3])  # initialised from token 3
    torch.testing.assert_close(out[0, 3], base.weight[5])
    out.sum().backward()
    assert [name for name, p in spliced.named_parameters() if p.requires_grad] == ["rows"]
    assert spliced.rows.grad is not None
    assert spliced.rows.grad.abs().sum() > 0


def test_an_optimizer_step_with_weight_decay_moves_only_the_new_rows() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(10, 4).requires_grad_(False)
    before = base.weight.detach().clone()
    spliced = ModifierTokenEmbedding(base, first_new_id=10, initial_rows=base.weight[[3]])
    trainable = [p for p in spliced.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1, weight_decay=0.5)
    spliced(torch.tensor([[1, 10, 2]])).pow(2).sum().backward()
    optimizer.step()
    assert torch.equal(base.weight, before)
    assert not torch.equal(spliced.rows.detach(), before[[3]])


def test_crossattn_trains_copies_of_query_and_output_too() -> None:
    from diffusers import UNet2DConditionModel

    from finetune.assets import _configs
    from finetune.trainer.methods.custom_diffusion import custom_attention, processor_state

    unet = UNet2DConditionModel(**_configs("tiny", 16)["unet"])
    custom_attention(unet, train_q_out=True)
    state = processor_state(unet)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attention = unet.get_submodule(name)
    for copy, original in (
        ("to_k_custom_diffusion.weight", attention.to_k.weight),
        ("to_q_custom_diffusion.weight", attention.to_q.weight),
        ("to_out_custom_diffusion.0.weight", attention.to_out[0].weight),
        ("to_out_custom_diffusion.0.bias", attention.to_out[0].bias),
    ):
        torch.testing.assert_close(state[f"{name}.processor.{copy}"], original.detach())
    assert state[name.replace("attn2", "attn1") + ".processor"].numel() == 0


def tokenizer_and_encoder(tmp_path: Path) -> tuple[object, object]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    size = write_tokenizer(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=size,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    return tokenizer, encoder


def test_modifier_tokens_are_added_and_start_from_their_initializers(tmp_path: Path) -> None:
    tokenizer, encoder = tokenizer_and_encoder(tmp_path)
    table = encoder.get_input_embeddings().weight.detach().clone()  # type: ignore[attr-defined]
    spliced = add_modifier_tokens(tokenizer, encoder, ["<new1>", "<new2>"], ["k", "p", "x"])
    new_ids = tokenizer.convert_tokens_to_ids(["<new1>", "<new2>"])  # type: ignore[attr-defined]
    assert tokenizer("a <new1> cat").input_ids[2] == new_ids[0]  # type: ignore[operator]
    k, p = (tokenizer.encode(w, add_special_tokens=False)[0] for w in "kp")  # type: ignore[attr-defined]
    embedded = spliced(torch.tensor([new_ids]))
    torch.testing.assert_close(embedded[0], table[[k, p]])


def test_modifier_token_mistakes_name_the_field(tmp_path: Path) -> None:
    tokenizer, encoder = tokenizer_and_encoder(tmp_path)
    with pytest.raises(JobInputError, match=r"initializerTokens\[0\]: 'ktn' is 3 tokens"):
        add_modifier_tokens(tokenizer, encoder, ["<new1>"], ["ktn"])
    tokenizer, encoder = tokenizer_and_encoder(tmp_path)
    with pytest.raises(JobInputError, match=r"modifierTokens\[1\]: '<new1>' is already a token"):
        add_modifier_tokens(tokenizer, encoder, ["<new1>", "<new1>"], ["k", "p"])


def test_scale_augmentation_masks_the_loss_to_the_image_and_says_so_in_the_prompt(
    tmp_path: Path,
) -> None:
    image = write_images(tmp_path, 1, resolution=64) / "image-000.png"
    augment = ScaleAugmentation(resolution=64, latent_factor=8, random_flip=True, seed=3)
    example = Example(image, "photo of <new1> disc")
    seen = set()
    for position in range(60):
        prepared = augment(example, position)
        again = augment(example, position)
        assert torch.equal(prepared.pixels, again.pixels)
        assert prepared.prompt == again.prompt
        assert prepared.mask is not None
        assert prepared.mask.shape == (1, 8, 8)
        assert not prepared.cacheable
        covered = prepared.mask.mean().item()
        if prepared.prompt.startswith(SMALL_PREFIXES):
            seen.add("small")
            assert 0 < covered < 0.36
            # Outside the image the canvas is blank (0 in [-1, 1]).
            blank = prepared.pixels.abs().sum(dim=0) == 0
            assert blank.float().mean() > 0.5
        elif prepared.prompt.startswith(LARGE_PREFIXES):
            seen.add("large")
            assert covered == 1.0
        else:
            assert prepared.prompt == example.prompt
            assert 0 < covered <= 1.0
    assert seen == {"small", "large"}
