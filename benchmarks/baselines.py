"""The loops of diffusers' example training scripts, reduced to their work: the baselines
`step_time.py` measures our trainer against, one per method, all in one process with
torch AdamW and no DeepSpeed (the parts they share are in `baseline_parts.py`).

Trained weights are fp32; frozen models are stored in the compute dtype (bf16 with
`--bf16`) and run under autocast, as the example scripts do. With `Bench.family`
"sdxl" the LoRA and DreamBooth loops train Stable Diffusion XL as
`train_dreambooth_lora_sdxl.py` does (two text encoders, time ids, the VAE in fp32).
Each loop returns the median step time after warm-up and the peak memory (GPU memory on
a GPU, resident set size on a CPU). Nothing here imports our trainer: it is what a user
would write by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from baseline_parts import (  # benchmarks/ is on the path when step_time.py runs
    Bench,
    Models,
    add_lora,
    chosen,
    models_for,
    pixels_of,
    timed,
    trained,
)

PROMPT = "a photo of sks disc"
# Custom Diffusion's concept token, started from an existing token's embedding.
MODIFIER_TOKEN, INITIALIZER_TOKEN = "<new1>", "a"
CUSTOM_PROMPT = f"a photo of {MODIFIER_TOKEN} disc"
CAPTION = "a red disc"
ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
LCM_LORA_TARGETS = [*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LCM_LORA_TARGETS += ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv"]
LCM_LORA_TARGETS += ["upsamplers.0.conv", "time_emb_proj"]
SDXL_METHODS = ("lora", "dreambooth")


def run(method: str, bench: Bench) -> dict[str, Any]:
    if bench.family == "sdxl" and method not in SDXL_METHODS:
        raise ValueError(f"no SDXL baseline for {method}: only {', '.join(SDXL_METHODS)}")
    loops: dict[str, Callable[[Bench], dict[str, Any]]] = {
        "lora": lambda b: concept_loop(b, lora=True),
        "dreambooth": lambda b: concept_loop(b, lora=False),
        "customDiffusion": custom_diffusion_loop,
        "lcm": lambda b: lcm_loop(b, lora=False),
        "lcmLora": lambda b: lcm_loop(b, lora=True),
    }
    return loops[method](bench)


# --- DreamBooth and LoRA (train_dreambooth.py, train_dreambooth_lora.py, ---------------
# --- train_dreambooth_lora_sdxl.py; SDXL DreamBooth: the same loop, the whole UNet) -----


def concept_loop(bench: Bench, lora: bool) -> dict[str, Any]:
    import torch.nn.functional as F

    m = models_for(bench)
    if lora:
        add_lora(m.unet, 4, ATTENTION)
    m.unet.to(m.device, m.dtype)
    params = trained(m.unet)
    text, extra = m.conditioning(PROMPT, bench.batch)
    # Deterministic preprocessing: the latents' distributions are cached, as ours does.
    dists = m.latent_dists(pixels_of(bench.images, bench.resolution))

    def step(index: int) -> Any:
        import torch

        picked = [dists[(index * bench.batch + i) % len(dists)] for i in range(bench.batch)]
        latents = torch.cat([d.sample() for d in picked]).float() * m.vae.config.scaling_factor
        noisy, noise, timesteps = m.noised(latents)
        with m.autocast():
            prediction = m.unet(noisy.to(m.dtype), timesteps, text, **extra).sample
        return F.mse_loss(prediction.float(), noise)

    return timed(m, bench.steps, params, 1e-4, step)


# --- Custom Diffusion (train_custom_diffusion.py) --------------------------------------


def custom_diffusion_loop(bench: Bench) -> dict[str, Any]:
    """A new token's embedding row and the cross-attention key/value copies train; the
    images change every step (scale augmentation), so they are encoded every step."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor

    m = Models(bench)
    m.tokenizer.add_tokens([MODIFIER_TOKEN])
    new_id = m.tokenizer.convert_tokens_to_ids(MODIFIER_TOKEN)
    start_id = m.tokenizer.encode(INITIALIZER_TOKEN, add_special_tokens=False)[0]
    m.text_encoder.resize_token_embeddings(len(m.tokenizer))
    m.text_encoder.float()
    embeddings = m.text_encoder.get_input_embeddings().weight
    embeddings.data[new_id] = embeddings.data[start_id]
    embeddings.requires_grad_(True)
    frozen_rows = torch.arange(len(m.tokenizer), device=m.device) != new_id

    m.unet.requires_grad_(False)
    processors = dict(m.unet.attn_processors)
    for name, module in m.unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            processor = CustomDiffusionAttnProcessor(
                train_kv=True,
                train_q_out=False,
                hidden_size=module.to_q.out_features,
                cross_attention_dim=module.to_k.in_features,
            )
            processor.to_k_custom_diffusion.weight.data.copy_(module.to_k.weight.data)
            processor.to_v_custom_diffusion.weight.data.copy_(module.to_v.weight.data)
            processors[f"{name}.processor"] = processor
    m.unet.set_attn_processor(processors)
    m.unet.to(m.device, m.dtype)
    params = [embeddings, *trained(m.unet)]
    pixels = pixels_of(bench.images, bench.resolution)
    ids = m.ids(CUSTOM_PROMPT, bench.batch)
    # Only the new token's row may move: the script zeroes the others' gradients.
    embeddings.register_hook(lambda grad: grad * ~frozen_rows[:, None])

    def step(index: int) -> Any:
        latents = m.latents(chosen(pixels, index, bench.batch))
        noisy, noise, timesteps = m.noised(latents)
        with m.autocast():
            text = m.text_encoder(ids)[0]
            prediction = m.unet(noisy.to(m.dtype), timesteps, text).sample
        return F.mse_loss(prediction.float(), noise)

    return timed(m, bench.steps, params, 1e-5, step)


# --- LCM and LCM-LoRA (train_lcm_distill_sd_wds.py, train_lcm_distill_lora_sd_wds.py) --


def lcm_loop(bench: Bench, lora: bool) -> dict[str, Any]:
    """Per step: encode the images, the student at a solver timestep, the frozen teacher
    twice (classifier-free guidance at a drawn w), one DDIM step back, the target network
    at its end, the L2 loss; `lcm` then moves its EMA target."""
    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    m = Models(bench)
    teacher = copy.deepcopy(m.unet).requires_grad_(False).to(m.device, m.dtype)
    embed_dim: int | None = None
    if lora:
        add_lora(m.unet, 64, LCM_LORA_TARGETS)
        student = m.unet.to(m.device, m.dtype)
        target = student
    else:
        embed_dim = 256
        student = UNet2DConditionModel.from_config(m.unet.config, time_cond_proj_dim=embed_dim)
        student.load_state_dict(m.unet.state_dict(), strict=False)
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        student.to(m.device)
        target = copy.deepcopy(student).requires_grad_(False)
    params = trained(student)
    alphas = m.scheduler.alphas_cumprod.to(m.device).float()
    solver_steps = 50
    skip = m.scheduler.config.num_train_timesteps // solver_steps
    timesteps = torch.arange(1, solver_steps + 1, device=m.device) * skip - 1
    pixels = pixels_of(bench.images, bench.resolution)
    text = m.text(CAPTION, bench.batch).to(m.dtype)
    unconditional = m.text("", bench.batch).to(m.dtype)

    def scalings(t: Any) -> tuple[Any, Any]:
        scaled = 10.0 * t.float()
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        return c_skip[:, None, None, None], c_out[:, None, None, None]

    def x0_of(output: Any, t: Any, sample: Any) -> tuple[Any, Any]:
        alpha = alphas[t][:, None, None, None]
        return (sample - (1 - alpha).sqrt() * output.float()) / alpha.sqrt(), output.float()

    def step(index: int) -> Any:
        latents = m.latents(chosen(pixels, index, bench.batch))
        batch = latents.shape[0]
        picked = torch.randint(0, solver_steps, (batch,), device=m.device)
        start = timesteps[picked]
        end = (start - skip).clamp(min=0)
        alpha = alphas[start][:, None, None, None]
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * torch.randn_like(latents)
        w = 3.0 + 12.0 * torch.rand(batch, device=m.device)
        cond = None
        if embed_dim is not None:
            # The pipeline's embedding of the guidance scale; it does not use `self`.
            embed = StableDiffusionPipeline.get_guidance_scale_embedding
            cond = embed(None, w, embed_dim).to(m.device, m.dtype)
        with m.autocast():
            output = student(noisy.to(m.dtype), start, text, timestep_cond=cond).sample
        skip_start, out_start = scalings(start)
        prediction = skip_start * noisy + out_start * x0_of(output, start, noisy)[0]
        with torch.no_grad(), m.autocast():
            both = teacher(
                torch.cat([noisy, noisy]).to(m.dtype),
                torch.cat([start, start]),
                torch.cat([text, unconditional]),
            ).sample
            x0, eps = x0_of(both, torch.cat([start, start]), torch.cat([noisy, noisy]))
            scale = w[:, None, None, None]
            x0 = x0[:batch] + scale * (x0[:batch] - x0[batch:])
            eps = eps[:batch] + scale * (eps[:batch] - eps[batch:])
            previous = alphas[(start - skip).clamp(min=0)][:, None, None, None]
            x_end = previous.sqrt() * x0 + (1 - previous).sqrt() * eps
            goal_output = target(x_end.to(m.dtype), end, text, timestep_cond=cond).sample
            skip_end, out_end = scalings(end)
            goal = skip_end * x_end + out_end * x0_of(goal_output, end, x_end)[0]
        return F.mse_loss(prediction.float(), goal.float())  # `lossType: l2`, the default

    def move_target() -> None:
        """`lcm`: the target network follows the student (EMA, decay 0.95)."""
        with torch.no_grad():
            for kept, moved in zip(target.parameters(), student.parameters(), strict=True):
                kept.mul_(0.95).add_(moved.detach().float(), alpha=0.05)

    return timed(m, bench.steps, params, 1e-4, step, None if lora else move_target)
