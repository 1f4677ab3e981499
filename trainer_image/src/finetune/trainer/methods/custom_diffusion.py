"""Custom Diffusion: a new token per concept, plus the UNet's cross-attention weights.

Only the new tokens' embedding rows train in the text encoder. They are held
as their own small parameter spliced into the embedding lookup, rather than
as the whole embedding matrix with the other rows' gradients zeroed: the
other rows then cannot move at all, whatever DeepSpeed does with gradients
(ZeRO-2 reduces them in buckets during backward, before any hook the loop
could run after it) and whatever weight decay the optimizer applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.api.training import FreezeMode
from finetune.trainer.data.concepts import Example, Prepared, to_tensor
from finetune.trainer.data.images import ImageRules, decode
from finetune.trainer.errors import JobInputError
from finetune.trainer.methods.base import TrainedModules, TrainingMethod

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"
SMALL_PREFIXES = ("a far away ", "very small ")
LARGE_PREFIXES = ("zoomed in ", "close up ")


class ModifierTokenEmbedding(nn.Module):
    """The text encoder's token embedding, with the rows of the new tokens trainable."""

    def __init__(self, base: nn.Embedding, first_new_id: int, initial_rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.rows = nn.Parameter(initial_rows.detach().clone().float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        known = self.base(input_ids.masked_fill(is_new, 0))
        new = F.embedding((input_ids - self.first_new_id).clamp(min=0), self.rows)
        return torch.where(is_new[..., None], new.to(known.dtype), known)


def add_modifier_tokens(
    tokenizer: Any, text_encoder: Any, tokens: list[str], initializers: list[str]
) -> ModifierTokenEmbedding:
    """Add `tokens` to the tokenizer, each starting from its initializer's embedding,
    and splice their trainable rows into `text_encoder`."""
    first_new_id = len(tokenizer)
    for index, token in enumerate(tokens):
        if tokenizer.add_tokens(token) != 1:
            raise JobInputError(
                f"spec.customDiffusion.modifierTokens[{index}]: {token!r} is already a token "
                "of the model's tokenizer; pick a new one such as <new1>"
            )
    embeddings = text_encoder.get_input_embeddings()
    rows = []
    for index, word in enumerate(initializers[: len(tokens)]):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise JobInputError(
                f"spec.customDiffusion.initializerTokens[{index}]: {word!r} is {len(ids)} tokens "
                "for this model's tokenizer; it must be exactly one"
            )
        rows.append(embeddings.weight[ids[0]])
    spliced = ModifierTokenEmbedding(embeddings, first_new_id, torch.stack(rows))
    text_encoder.set_input_embeddings(spliced)
    return spliced


def custom_attention(unet: Any, train_q_out: bool) -> None:
    """Give every cross-attention layer trainable copies of its key/value (and query/output)
    projections, initialised from the originals; self-attention stays as it is."""
    from diffusers.models.attention_processor import (
        CustomDiffusionAttnProcessor,
        CustomDiffusionAttnProcessor2_0,
    )

    fast = hasattr(F, "scaled_dot_product_attention")
    processor_class = CustomDiffusionAttnProcessor2_0 if fast else CustomDiffusionAttnProcessor
    processors = {}
    for name in unet.attn_processors:
        attention = unet.get_submodule(name.removesuffix(".processor"))
        if not attention.is_cross_attention:
            processors[name] = processor_class(train_kv=False, train_q_out=False)
            continue
        processor = processor_class(
            train_kv=True,
            train_q_out=train_q_out,
            hidden_size=attention.to_k.out_features,
            cross_attention_dim=attention.to_k.in_features,
        )
        copies = {
            "to_k_custom_diffusion.weight": attention.to_k.weight,
            "to_v_custom_diffusion.weight": attention.to_v.weight,
        }
        if train_q_out:
            copies["to_q_custom_diffusion.weight"] = attention.to_q.weight
            copies["to_out_custom_diffusion.0.weight"] = attention.to_out[0].weight
            copies["to_out_custom_diffusion.0.bias"] = attention.to_out[0].bias
        processor.load_state_dict({k: v.detach().float() for k, v in copies.items()})
        processors[name] = processor
    unet.set_attn_processor(processors)


def processor_state(unet: Any) -> dict[str, torch.Tensor]:
    """The trained processors in the key layout `load_attn_procs` reads. Self-attention
    processors have no weights; an empty tensor stands for each, since safetensors
    cannot store the empty dicts that layout uses, and the loader needs every layer."""
    state: dict[str, torch.Tensor] = {}
    for name, processor in unet.attn_processors.items():
        weights = processor.state_dict()
        if not weights:
            state[name] = torch.empty(0)
        for key, value in weights.items():
            state[f"{name}.{key}"] = value.detach().float().cpu().contiguous()
    return state


class ScaleAugmentation:
    """The reference method's augmentation: the image drawn smaller (on a blank canvas,
    the loss masked to it) or larger (cropped) than the resolution, the prompt told so."""

    def __init__(
        self,
        resolution: int,
        latent_factor: int,
        random_flip: bool,
        seed: int,
        rules: ImageRules | None = None,
    ) -> None:
        self.resolution = resolution
        self.factor = latent_factor
        self.random_flip = random_flip
        self.seed = seed
        self.rules = rules or ImageRules()

    def __call__(self, example: Example, position: int) -> Prepared:
        from PIL import Image, ImageOps

        size = self.resolution
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + position)

        def draw(low: int, high: int) -> int:
            return int(torch.randint(low, high + 1, (1,), generator=rng))

        if float(torch.rand(1, generator=rng)) < 0.66:
            scale = draw(size // 3, size)
        else:
            scale = draw(int(1.2 * size), int(1.4 * size))
        image = decode(example.image, str(example.image), self.rules)
        image = image.resize((scale, scale), Image.Resampling.BILINEAR)
        if self.random_flip and float(torch.rand(1, generator=rng)) < 0.5:
            image = ImageOps.mirror(image)
        latent = size // self.factor
        mask = torch.zeros(1, latent, latent)
        if scale >= size:
            left, top = draw(0, scale - size), draw(0, scale - size)
            pixels = to_tensor(image.crop((left, top, left + size, top + size)))
            mask[:] = 1
        else:
            left, top = draw(0, size - scale), draw(0, size - scale)
            pixels = torch.zeros(3, size, size)  # mid-grey in [-1, 1]
            pixels[:, top : top + scale, left : left + scale] = to_tensor(image)
            # Latent cells wholly inside the image (one cell in from each edge).
            y0, y1 = top // self.factor + 1, (top + scale) // self.factor - 1
            x0, x1 = left // self.factor + 1, (left + scale) // self.factor - 1
            if y1 <= y0 or x1 <= x0:
                y0, y1 = (
                    top // self.factor,
                    max(top // self.factor + 1, (top + scale) // self.factor),
                )
                x0, x1 = (
                    left // self.factor,
                    max(left // self.factor + 1, (left + scale) // self.factor),
                )
            mask[:, y0:y1, x0:x1] = 1
        prompt = example.prompt
        if scale < 0.6 * size:
            prompt = SMALL_PREFIXES[draw(0, 1)] + prompt
        elif scale > size:
            prompt = LARGE_PREFIXES[draw(0, 1)] + prompt
        return Prepared(pixels, prompt, cacheable=False, mask=mask)


class CustomDiffusion(TrainingMethod):
    @property
    def settings(self) -> Any:
        cd = self.spec.custom_diffusion
        assert cd is not None  # the API requires the section for this method
        return cd

    @property
    def keeps_aspect_ratio(self) -> bool:
        return not self.settings.augmentation  # the scale augmentation draws squares

    def build(self) -> TrainedModules:
        c, cd = self.components, self.settings
        for part in (c.unet, c.vae, c.text_encoder):
            part.requires_grad_(False)
        self.embedding = add_modifier_tokens(
            c.tokenizer, c.text_encoder, cd.modifier_tokens, cd.initializer_tokens
        )
        custom_attention(c.unet, train_q_out=cd.freeze_model == FreezeMode.CROSSATTN)
        if self.spec.training.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
        factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
        data = self.spec.data
        self.augment = (
            ScaleAugmentation(
                data.resolution,
                factor,
                data.random_flip,
                self.spec.training.seed,
                ImageRules.of(data),
            )
            if cd.augmentation
            else None
        )
        return TrainedModules(c.unet, c.text_encoder, family=c.family)

    def prepare(self, example: Example, position: int, is_class: bool) -> Prepared:
        if self.augment is None or is_class:
            return super().prepare(example, position, is_class)
        return self.augment(example, position)

    def save(self, module: TrainedModules, folder: Path) -> list[Path]:
        """The attention weights for `unet.load_attn_procs`, and one file per token for
        `load_textual_inversion`."""
        from safetensors.torch import save_file

        save_file(processor_state(module.unet), folder / WEIGHTS_FILE, metadata={"format": "pt"})
        written = [folder / WEIGHTS_FILE]
        rows = self.embedding.rows.detach().float().cpu()
        for token, row in zip(self.settings.modifier_tokens, rows, strict=True):
            path = folder / f"{token}.safetensors"
            save_file({token: row.clone().contiguous()}, path)
            written.append(path)
        return written
