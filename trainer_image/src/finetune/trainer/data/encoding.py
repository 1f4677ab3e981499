"""Images to latents and prompts to text embeddings, with the frozen VAE and text encoder."""

from __future__ import annotations

import logging
from typing import Any

import torch

from finetune.trainer.models.components import Components

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
        self._text: dict[str, torch.Tensor] = {}
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

    def latents(self, pixels: torch.Tensor, cache_key: Any = None) -> torch.Tensor:
        """Sampled, scaled latents of a batch of [-1, 1] images. With a `cache_key`
        (one image only) the latent distribution is kept for `cached_latents`."""
        with torch.no_grad():
            encoded = self.components.vae.encode(pixels.to(self.device, self.dtype))
        parameters = encoded.latent_dist.parameters
        if cache_key is not None and self.cache:
            self._latents[cache_key] = parameters
        return self._sample(parameters)

    def tokens(self, prompts: list[str]) -> torch.Tensor:
        """Token ids, cut to the tokenizer's limit (with a warning naming each cut prompt)."""
        self.prompt_lengths.check(prompts)
        tokenizer = self.components.tokenizer
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.device)  # type: ignore[no-any-return]

    def embeddings(self, prompts: list[str]) -> torch.Tensor:
        """The frozen text encoder's hidden states for `prompts`."""
        if not self.cache:
            with torch.no_grad():
                return self.components.text_encoder(self.tokens(prompts))[0]  # type: ignore[no-any-return]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            with torch.no_grad():
                states = self.components.text_encoder(self.tokens(missing))[0]
            self._text.update(zip(missing, states, strict=True))
        return torch.stack([self._text[p] for p in prompts])

    def text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """What the trained modules take as the prompt: token ids when the text
        encoder trains, its hidden states otherwise."""
        if self.text_encoder_trains:
            return {"input_ids": self.tokens(prompts)}
        return {"encoder_hidden_states": self.embeddings(prompts)}
