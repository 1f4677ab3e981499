"""Custom Diffusion: a new token per concept, plus the UNet's cross-attention weights.

Only the new tokens' embedding rows train in the text encoders (each of the model
family's, with the tokens added to each tokenizer). They are held in each encoder
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

from finetune.api.method_settings import FreezeMode
from finetune.trainer.data.concepts import Example, Prepared, to_tensor
from finetune.trainer.data.geometry import ImageGeometry
from finetune.trainer.data.images import ImageRules, decode
from finetune.trainer.errors import JobInputError
from finetune.trainer.families import Components
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
    tokenizer: Any,
    text_encoder: Any,
    tokens: list[str],
    initializers: list[str],
    tokenizer_name: str = "tokenizer",
) -> ModifierTokenEmbedding:
    """Add `tokens` to the tokenizer, each starting from its initializer's embedding,
    and splice their trainable rows into `text_encoder`. Mistakes name the field and
    the tokenizer (`tokenizer_name`, as the pipeline calls it)."""
    first_new_id = len(tokenizer)
    for index, token in enumerate(tokens):
        if tokenizer.add_tokens(token) != 1:
            raise JobInputError(
                f"spec.customDiffusion.modifierTokens[{index}]: {token!r} is already a token "
                f"of the model's {tokenizer_name}; pick a new one such as <new1>"
            )
    embeddings = text_encoder.get_input_embeddings()
    rows = []
    for index, word in enumerate(initializers[: len(tokens)]):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise JobInputError(
                f"spec.customDiffusion.initializerTokens[{index}]: {word!r} is {len(ids)} tokens "
                f"for the model's {tokenizer_name}; it must be exactly one"
            )
        rows.append(embeddings.weight[ids[0]])
    spliced = ModifierTokenEmbedding(embeddings, first_new_id, torch.stack(rows))
    text_encoder.set_input_embeddings(spliced)
    return spliced


def add_modifier_tokens_everywhere(
    components: Components, tokens: list[str], initializers: list[str]
) -> None:
    """The new tokens in every tokenizer of the model, their rows trainable in the text
    encoder each feeds (both of SDXL's: the UNet reads both encoders' states)."""
    for name, encoder in components.text_encoders.items():
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        tokenizer = components.tokenizers[name]
        add_modifier_tokens(tokenizer, encoder, tokens, initializers, tokenizer_name)


def trained_rows(module: TrainedModules) -> dict[str, torch.Tensor]:
    """The new tokens' rows ([tokens, width], float32 on the CPU) by text encoder."""
    rows = {}
    for name, encoder in module.text_encoders.items():
        spliced = next(m for m in encoder.modules() if isinstance(m, ModifierTokenEmbedding))
        rows[name] = spliced.rows.detach().float().cpu()
    return rows


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
    the loss masked to it) or larger (cropped) than the resolution, the prompt told so.

    Its geometry (SDXL's time ids) is the file's size as the original, the training size
    as the target, and as the crop corner where the crop of an enlarged image begins, or
    (0, 0) for an image drawn smaller, of which nothing is cut away."""

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
        original = (image.height, image.width)
        image = image.resize((scale, scale), Image.Resampling.BILINEAR)
        if self.random_flip and float(torch.rand(1, generator=rng)) < 0.5:
            image = ImageOps.mirror(image)
        latent = size // self.factor
        mask = torch.zeros(1, latent, latent)
        if scale >= size:
            left, top = draw(0, scale - size), draw(0, scale - size)
            pixels = to_tensor(image.crop((left, top, left + size, top + size)))
            mask[:] = 1
            crop = (top, left)
        else:
            left, top = draw(0, size - scale), draw(0, size - scale)
            pixels = torch.zeros(3, size, size)  # mid-grey in [-1, 1]
            pixels[:, top : top + scale, left : left + scale] = to_tensor(image)
            crop = (0, 0)
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
        geometry = ImageGeometry(original, crop, (size, size))
        return Prepared(pixels, prompt, cacheable=False, mask=mask, geometry=geometry)


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
        for part in (c.unet, c.vae, *c.text_encoders.values()):
            part.requires_grad_(False)
        add_modifier_tokens_everywhere(c, cd.modifier_tokens, cd.initializer_tokens)
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
        return TrainedModules(c.unet, family=c.family, **c.text_encoders)

    def prepare(self, example: Example, position: int, is_class: bool) -> Prepared:
        if self.augment is None or is_class:
            return super().prepare(example, position, is_class)
        return self.augment(example, position)

    def save(self, module: TrainedModules, folder: Path) -> list[Path]:
        """The attention weights for `unet.load_attn_procs`, and one file per token for
        `load_textual_inversion`, laid out as the model family's pipeline loads it."""
        from safetensors.torch import save_file

        save_file(processor_state(module.unet), folder / WEIGHTS_FILE, metadata={"format": "pt"})
        written = [folder / WEIGHTS_FILE]
        rows = trained_rows(module)
        for index, token in enumerate(self.settings.modifier_tokens):
            path = folder / f"{token}.safetensors"
            mine = {name: table[index].clone().contiguous() for name, table in rows.items()}
            save_file(self.components.family.embedding_file(token, mine), path)
            written.append(path)
        return written
