"""What every baseline loop in `baselines.py` shares: the bench's settings, a pipeline
folder's parts on the device (Stable Diffusion 1.x/2.x or XL), the images, and the timed
AdamW loop that reports step time, peak memory and FLOPs.

Nothing here imports our trainer: it is what a user would write by hand.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WARMUP_STEPS = 5


@dataclass(frozen=True)
class Bench:
    model: Path
    images: Path
    steps: int
    batch: int
    resolution: int
    bf16: bool
    family: str = "sd"  # or "sdxl"


class Models:
    """A Stable Diffusion 1.x/2.x folder's parts on the device: frozen ones in the compute
    dtype."""

    vae_in_float32 = False

    def __init__(self, bench: Bench) -> None:
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if bench.bf16 else torch.float32
        torch.manual_seed(0)
        model = bench.model
        self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        vae_dtype = torch.float32 if self.vae_in_float32 else self.dtype
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(self.device, vae_dtype)
        self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        self.scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        self.text_encoder.requires_grad_(False).to(self.device, self.dtype)
        self.vae.requires_grad_(False)

    def autocast(self) -> Any:
        import torch

        return torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )

    def ids(self, prompt: str, count: int, tokenizer: Any = None) -> Any:
        tokenizer = tokenizer or self.tokenizer
        return tokenizer(
            [prompt] * count,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def text(self, prompt: str, count: int) -> Any:
        import torch

        with torch.no_grad():
            return self.text_encoder(self.ids(prompt, count))[0]

    def conditioning(self, prompt: str, count: int) -> tuple[Any, dict[str, Any]]:
        """The UNet's text input for `prompt` (`count` rows) and its other keyword arguments."""
        return self.text(prompt, count), {}

    def latent_dists(self, pixels: Any) -> list[Any]:
        """Each image's latent distribution, encoded once (`--cache_latents`)."""
        import torch

        with torch.no_grad():
            return [
                self.vae.encode(p[None].to(self.device, self.vae.dtype)).latent_dist for p in pixels
            ]

    def latents(self, pixels: Any) -> Any:
        import torch

        with torch.no_grad():
            encoded = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.sample()
        return encoded.float() * self.vae.config.scaling_factor

    def noised(self, latents: Any) -> tuple[Any, Any, Any]:
        import torch

        noise = torch.randn_like(latents)
        total = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, total, (latents.shape[0],), device=self.device)
        return self.scheduler.add_noise(latents, noise, timesteps), noise, timesteps


class XLModels(Models):
    """Stable Diffusion XL's parts: a second tokenizer and text encoder (with projection),
    and the VAE in fp32, since SDXL's overflows in half precision."""

    vae_in_float32 = True

    def __init__(self, bench: Bench) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        super().__init__(bench)
        self.resolution = bench.resolution
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(bench.model, subfolder="tokenizer_2")
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            bench.model, subfolder="text_encoder_2"
        )
        self.text_encoder_2.requires_grad_(False).to(self.device, self.dtype)

    def conditioning(self, prompt: str, count: int) -> tuple[Any, dict[str, Any]]:
        """Both encoders' penultimate hidden states side by side; the second's pooled
        embedding and the time ids (original size, crop corner, target size: the images
        are squares at the training resolution) as the UNet's added conditions."""
        import torch

        with torch.no_grad():
            first = self.text_encoder(self.ids(prompt, count), output_hidden_states=True)
            second = self.text_encoder_2(
                self.ids(prompt, count, self.tokenizer_2), output_hidden_states=True
            )
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * count, device=self.device)
        added = {"text_embeds": second.text_embeds, "time_ids": time_ids.to(self.dtype)}
        return hidden, {"added_cond_kwargs": added}


def models_for(bench: Bench) -> Models:
    return XLModels(bench) if bench.family == "sdxl" else Models(bench)


def pixels_of(images: Path, resolution: int) -> Any:
    """Every PNG in `images` as one [-1, 1] tensor, N x 3 x H x W (decoded once)."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = [
        np.asarray(Image.open(p).convert("RGB").resize((resolution, resolution)))
        for p in sorted(images.glob("*.png"))
    ]
    return torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def chosen(pixels: Any, step: int, batch: int) -> Any:
    return pixels[[(step * batch + i) % len(pixels) for i in range(batch)]]


def trained(module: Any) -> list[Any]:
    """`module`'s trainable parameters, as fp32 masters."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def timed(
    models: Models,
    steps: int,
    params: list[Any],
    lr: float,
    step: Callable[[int], Any],
    after: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run `step(i)` (which returns the loss) `steps` times with AdamW over `params`,
    then `after()` (a method's own update) in each step's time."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)

    def one_step(index: int) -> None:
        loss = step(index)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after is not None:
            after()
        float(loss.detach())  # wait for the step, as ours does when it logs the loss

    times = []
    for index in range(steps):
        started = time.perf_counter()
        one_step(index)
        times.append(time.perf_counter() - started)
    peak = (
        torch.cuda.max_memory_allocated()
        if models.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    # One more, untimed step counts the work (matmuls and convolutions, forward and
    # backward) that model FLOPs utilisation divides by the step time.
    with FlopCounterMode(display=False) as counter:
        one_step(steps)
    return {
        "step_seconds": statistics.median(times[WARMUP_STEPS:]),
        "peak_bytes": peak,
        "flops_per_step": counter.get_total_flops(),
        "device": torch.cuda.get_device_name(models.device)
        if models.device.type == "cuda"
        else "cpu",
    }


def add_lora(unet: Any, rank: int, targets: list[str]) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    )
