"""Images to latents and prompts to the UNet's conditioning, with the frozen VAE and text
encoders; the model's family says how a prompt becomes conditioning."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from finetune.trainer.families import Components, ImageGeometry

log = logging.getLogger(__name__)

MAX_PROMPT_WARNINGS = 20  # distinct cut prompts named before falling silent
SHOWN_PROMPT_CHARS = 60


def abbreviated(prompt: str, limit: int = SHOWN_PROMPT_CHARS) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


class PromptLengths:
    """Warns once per distinct prompt the tokenizer cuts, naming it and how many
    tokens it loses (CLIP keeps 77, start and end markers included)."""

    def __init__(self, tokenizer: Any, announce: bool = True) -> None:
        self.tokenizer = tokenizer
        self.announce = announce
        self.warned: set[str] = set()

    def check(self, prompts: list[str]) -> None:
        if not self.announce or len(self.warned) >= MAX_PROMPT_WARNINGS:
            return
        limit = int(self.tokenizer.model_max_length)
        for prompt in dict.fromkeys(prompts):
            if prompt in self.warned:
                continue
            # verbose=False: the tokenizer's own, prompt-less warning stays quiet.
            count = len(self.tokenizer(prompt, verbose=False).input_ids)
            if count <= limit:
                continue
            self.warned.add(prompt)
            log.warning(
                "prompt %r is %d tokens long; the tokenizer keeps %d, so the last %d are dropped",
                abbreviated(prompt),
                count,
                limit,
                count - limit,
            )
            if len(self.warned) == MAX_PROMPT_WARNINGS:
                log.warning(
                    "%d prompts cut so far; further ones are not reported", len(self.warned)
                )
                return


class Encoder:
    """Encodes what the methods train on. Prompts are embedded here when the text
    encoder is frozen; when it trains, only token ids leave, for the engine to embed.
    `announce`: warn about prompts the tokenizer cuts (one rank is enough when every
    rank sees the same prompts).

    `cache` keeps VAE latent distributions and prompt embeddings for reuse: right
    for a few concept images seen thousands of times, wrong for a streamed dataset.
    """

    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        text_encoder_trains: bool,
        cache: bool,
        announce: bool = True,
    ) -> None:
        self.components = components
        self.device = device
        self.dtype = dtype
        self.text_encoder_trains = text_encoder_trains
        self.cache = cache
        self._latents: dict[Any, torch.Tensor] = {}
        self._text: dict[str, dict[str, torch.Tensor]] = {}
        self.prompt_lengths = PromptLengths(components.tokenizer, announce)

    def cached_latents(self, cache_key: Any) -> torch.Tensor | None:
        """Freshly sampled latents from a cached distribution, if there is one."""
        if cache_key not in self._latents:
            return None
        return self._sample(self._latents[cache_key])

    def _sample(self, parameters: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents: torch.Tensor = DiagonalGaussianDistribution(parameters).sample()
        return latents.float() * float(self.components.vae.config.scaling_factor)

    def latents(
        self, pixels: torch.Tensor, cache_keys: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """Sampled, scaled latents of a batch of [-1, 1] images, encoded in one VAE call.
        The latent distribution of each image with a key in `cache_keys` (one entry per
        image, None for those that change every time) is kept for `cached_latents`."""
        with torch.no_grad():
            vae = self.components.vae
            encoded = vae.encode(pixels.to(self.device, vae.dtype))
        parameters = encoded.latent_dist.parameters
        if cache_keys is not None and self.cache:
            for row, key in enumerate(cache_keys):
                if key is not None:
                    self._latents[key] = parameters[row : row + 1].clone()
        return self._sample(parameters)

    def tokens(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids for each text encoder, cut to the tokenizer's limit (with a warning
        naming each cut prompt)."""
        self.prompt_lengths.check(prompts)
        return self.components.family.tokenize(self.components, prompts, self.device)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.components.family.encode(
                self.components.text_encoders, self.tokens(prompts)
            )

    def conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The frozen text encoders' conditioning for `prompts` (`encoder_hidden_states`,
        and whatever else the family's UNet takes from the prompt)."""
        if not self.cache:
            return self._encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            encoded = self._encode(missing)
            for index, prompt in enumerate(missing):
                self._text[prompt] = {name: value[index] for name, value in encoded.items()}
        names = self._text[prompts[0]].keys()
        return {name: torch.stack([self._text[p][name] for p in prompts]) for name in names}

    def embeddings(self, prompts: list[str]) -> torch.Tensor:
        """The frozen text encoders' hidden states for `prompts`."""
        return self.conditioning(prompts)["encoder_hidden_states"]

    def images(self, geometry: list[ImageGeometry]) -> dict[str, torch.Tensor]:
        """What the family's UNet is told of each image beside its latents."""
        return self.components.family.image_inputs(geometry, self.device)

    def text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """What the trained modules take as the prompt: token ids when the text
        encoders train, their conditioning otherwise."""
        if self.text_encoder_trains:
            return self.tokens(prompts)
        return self.conditioning(prompts)
