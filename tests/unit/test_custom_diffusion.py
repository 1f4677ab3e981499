"""Custom Diffusion's parts that can be checked without training: modifier tokens, cross-attention copies, scale augmentation; for SD and SDXL."""

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
    add_modifier_tokens_everywhere,
    custom_attention,
    processor_state,
)
from finetune.trainer.models.components import load_components


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


def test_sdxl_modifier_tokens_train_a_row_in_both_text_encoders(tiny_sdxl_model: Path) -> None:
    """Both tokenizers learn the tokens; both encoders (32 and 48 wide) embed them from
    their initializers' rows; the UNet's conditioning reads both."""
    components = load_components(tiny_sdxl_model)
    tables = {
        name: encoder.get_input_embeddings().weight.detach().clone()
        for name, encoder in components.text_encoders.items()
    }
    for encoder in components.text_encoders.values():
        encoder.requires_grad_(False)  # as the method freezes them first
    add_modifier_tokens_everywhere(components, ["<new1>", "<new2>"], ["k", "p"])
    assert set(tables) == {"text_encoder", "text_encoder_2"}
    for name, encoder in components.text_encoders.items():
        tokenizer = components.tokenizers[name]
        new_ids = tokenizer.convert_tokens_to_ids(["<new1>", "<new2>"])
        assert tokenizer("a <new2> cat").input_ids[2] == new_ids[1]
        initial = [tokenizer.encode(w, add_special_tokens=False)[0] for w in "kp"]
        embedded = encoder.get_input_embeddings()(torch.tensor([new_ids]))
        torch.testing.assert_close(embedded[0], tables[name][initial])
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        assert len(trainable) == 1, name
        assert trainable[0].endswith("embeddings.token_embedding.rows"), name


def test_sdxl_cross_attention_copies_read_both_encoders_widths(tiny_sdxl_model: Path) -> None:
    unet = load_components(tiny_sdxl_model).unet
    custom_attention(unet, train_q_out=False)
    state = processor_state(unet)
    keys = [k for k in state if k.endswith("to_k_custom_diffusion.weight")]
    cross = [n for n in unet.attn_processors if ".attn2." in n]
    # Every transformer block's cross-attention (SDXL stacks two per attention here).
    assert [k.removesuffix(".to_k_custom_diffusion.weight") for k in keys] == cross
    assert any(".transformer_blocks.1." in name for name in cross)
    for key in keys:
        attention = unet.get_submodule(key.split(".processor.")[0])
        assert state[key].shape == (attention.to_k.out_features, 32 + 48)
        torch.testing.assert_close(state[key], attention.to_k.weight.detach())
    assert not any("to_q_custom_diffusion" in k for k in state)


def test_scale_augmentation_tells_sdxl_the_files_size_and_the_crop(tmp_path: Path) -> None:
    """A 48x80 (height x width) photo: its size is the original whatever the scale; an
    enlarged image's crop corner lies inside the spare pixels, a shrunk one is uncut."""
    from PIL import Image

    Image.new("RGB", (80, 48), "red").save(tmp_path / "wide.png")
    augment = ScaleAugmentation(resolution=64, latent_factor=8, random_flip=True, seed=3)
    example = Example(tmp_path / "wide.png", "photo of <new1> disc")
    crops = {"small": set(), "large": set()}
    for position in range(60):
        prepared = augment(example, position)
        geometry = prepared.geometry
        assert geometry is not None
        assert (geometry.original, geometry.target) == ((48, 80), (64, 64))
        if prepared.prompt.startswith(SMALL_PREFIXES):
            crops["small"].add(geometry.crop)
        elif prepared.prompt.startswith(LARGE_PREFIXES):
            crops["large"].add(geometry.crop)
            # Enlarged to 77-89 px square: at most 25 spare pixels each way.
            assert all(0 <= c <= 25 for c in geometry.crop), geometry.crop
    assert crops["small"] == {(0, 0)}
    assert len(crops["large"]) > 1
