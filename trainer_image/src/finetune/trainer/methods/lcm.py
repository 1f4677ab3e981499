"""Latent consistency distillation: a student that generates in 1-8 steps what the
teacher generates in many, learned from an image-caption dataset.

For a noisy latent at a timestep of the DDIM solver's skipping schedule, the
frozen teacher (with classifier-free guidance at a scale w drawn per sample)
takes one solver step back; the student's consistency function at the start
must match the target network's at the end of that step. `lcm` trains a whole
UNet that also takes w as an embedding, against an EMA target network;
`lcmLora` trains LoRA adapters and uses itself (without gradients) as the target.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finetune.api.method_settings import LcmLoss
from finetune.trainer.data.batches import Batch
from finetune.trainer.data.encoding import Encoder
from finetune.trainer.errors import JobInputError
from finetune.trainer.methods.base import TeacherSampling, TrainedModules, TrainingMethod
from finetune.trainer.methods.diffusion import in_dtype
from finetune.trainer.methods.lora import Lora
from finetune.trainer.models.components import save_pipeline

SIGMA_DATA = 0.5

Inputs = Mapping[str, torch.Tensor]
# A UNet run: (noisy latents, timesteps, the batch's inputs, guidance embedding or None).
UNetCall = Callable[[torch.Tensor, torch.Tensor, Inputs, "torch.Tensor | None"], torch.Tensor]


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the guidance scale, in the form diffusers' LCM and
    Stable Diffusion pipelines feed a UNet with `time_cond_proj_dim` (they embed
    guidance_scale - 1, the w of the training objective)."""
    half = dim // 2
    frequencies = torch.exp(
        torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1))
    )
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    features = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(features, (0, 1)) if dim % 2 else features


def boundary_scalings(timesteps: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip and c_out of the consistency function, so that it is the identity at t = 0."""
    t = scaling * timesteps.float()
    c_skip = SIGMA_DATA**2 / (t**2 + SIGMA_DATA**2)
    c_out = t / (t**2 + SIGMA_DATA**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


class Distillation:
    """The teacher, the DDIM solver over the skipping timesteps, and the loss."""

    def __init__(
        self, spec: Any, teacher_folder: Path | None, student_config: Any, student_scheduler: Any
    ) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        if teacher_folder is None:
            raise JobInputError("spec.lcm.teacherModel: a teacher model is needed")
        self.settings = spec.lcm
        try:
            self.teacher = UNet2DConditionModel.from_pretrained(teacher_folder, subfolder="unet")
            scheduler = DDPMScheduler.from_pretrained(teacher_folder, subfolder="scheduler")
        except (OSError, ValueError, RuntimeError) as exc:
            raise JobInputError(f"spec.lcm.teacherModel: cannot load the teacher: {exc}") from exc
        for key in (
            "in_channels",
            "out_channels",
            "cross_attention_dim",
            "addition_embed_type",
            "projection_class_embeddings_input_dim",
        ):
            if self.teacher.config[key] != student_config[key]:
                raise JobInputError(
                    f"spec.lcm.teacherModel: the teacher's UNet has {key} "
                    f"{self.teacher.config[key]}, the base model's {student_config[key]}; "
                    "they must share the text encoder and VAE"
                )
        self.teacher.requires_grad_(False).eval()
        self.teacher_folder = teacher_folder
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise JobInputError(
                f"spec.lcm.teacherModel: prediction type {self.prediction_type!r} is not supported"
            )
        if self.prediction_type != student_scheduler.config.prediction_type:
            raise JobInputError(
                f"spec.lcm.teacherModel: the teacher predicts {self.prediction_type}, the base "
                f"model {student_scheduler.config.prediction_type}; they must predict the same"
            )
        alphas_cumprod = scheduler.alphas_cumprod.float()
        total = scheduler.config.num_train_timesteps
        steps = self.settings.num_ddim_timesteps
        self.skip = total // steps
        self.timesteps = (torch.arange(1, steps + 1) * self.skip).round().long() - 1
        self.alphas_cumprod = alphas_cumprod
        previous = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])
        self.previous_alphas_cumprod = previous

    def attach(self, encoder: Encoder) -> None:
        # The teacher is on the device in this dtype already: the methods name it in
        # `frozen_models`, and the precision plan stores it.
        self.device, self.dtype = encoder.device, encoder.dtype
        for name in ("timesteps", "alphas_cumprod", "previous_alphas_cumprod"):
            setattr(self, name, getattr(self, name).to(self.device))
        self.family = encoder.components.family
        self.empty_prompt = encoder.conditioning([""])
        # The teacher is guided as its own pipeline guides it.
        self.teacher_options = self.family.pipeline_options(self.teacher_folder)

    def sampling(self) -> TeacherSampling:
        """The teacher as its own pipeline samples (after `attach`)."""
        return TeacherSampling({"unet": self.teacher}, self.scheduler.config, self.teacher_options)

    def _teacher(self, x: torch.Tensor, t: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        """The teacher's conditional and unconditional outputs in one batch. The family
        says what the unconditional branch is (SD: the empty prompt; SDXL: zeros, pooled
        embedding included, unless the teacher's `model_index.json` turns
        `force_zeros_for_empty_prompt` off) and how the whole conditioning reaches the UNet."""
        unconditional = self.family.unconditional(self.teacher_options, self.empty_prompt, inputs)
        both = {name: torch.cat([value, unconditional[name]]) for name, value in inputs.items()}
        return self.teacher(  # type: ignore[no-any-return]
            torch.cat([x, x]), torch.cat([t, t]), **self.family.unet_inputs(both)
        ).sample

    def _alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_cumprod = self.alphas_cumprod[timesteps][:, None, None, None]
        return alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()

    def _x0_and_noise(
        self, output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self._alpha_sigma(timesteps)
        output, sample = output.float(), sample.float()
        if self.prediction_type == "epsilon":
            return (sample - sigma * output) / alpha, output
        return alpha * sample - sigma * output, alpha * output + sigma * sample

    def loss(
        self,
        latents: torch.Tensor,
        inputs: Inputs,
        student: UNetCall,
        target: UNetCall,
        embed_guidance: int | None,
    ) -> torch.Tensor:
        """`student` is trained; `target` is called without gradients. `inputs`: the
        batch's conditioning and image inputs (`Batch.text`), which the teacher, the
        student and the target all receive."""
        lcm = self.settings
        batch = latents.shape[0]
        index = torch.randint(0, len(self.timesteps), (batch,), device=latents.device)
        start = self.timesteps[index]
        end = (start - self.skip).clamp(min=0)
        noise = torch.randn_like(latents)
        alpha, sigma = self._alpha_sigma(start)
        noisy = alpha * latents + sigma * noise
        w = lcm.w_min + (lcm.w_max - lcm.w_min) * torch.rand(batch, device=latents.device)
        cond = guidance_embedding(w, embed_guidance).to(self.dtype) if embed_guidance else None
        inputs = in_dtype(inputs, self.dtype)

        skip_start, out_start = boundary_scalings(start, lcm.timestep_scaling_factor)
        output = student(noisy.to(self.dtype), start, inputs, cond)
        prediction = skip_start * noisy + out_start * self._x0_and_noise(output, start, noisy)[0]

        with torch.no_grad():
            both = self._teacher(noisy.to(self.dtype), start, inputs)
            x0, eps = self._x0_and_noise(both, torch.cat([start, start]), torch.cat([noisy, noisy]))
            scale = w[:, None, None, None]
            x0 = x0[:batch] + scale * (x0[:batch] - x0[batch:])
            eps = eps[:batch] + scale * (eps[:batch] - eps[batch:])
            previous = self.previous_alphas_cumprod[index][:, None, None, None]
            x_end = previous.sqrt() * x0 + (1 - previous).sqrt() * eps  # one DDIM step back

            target_output = target(x_end.to(self.dtype), end, inputs, cond)
            skip_end, out_end = boundary_scalings(end, lcm.timestep_scaling_factor)
            goal = skip_end * x_end + out_end * self._x0_and_noise(target_output, end, x_end)[0]

        prediction, goal = prediction.float(), goal.float()
        if lcm.loss_type == LcmLoss.HUBER:
            return torch.mean(torch.sqrt((prediction - goal) ** 2 + lcm.huber_c**2) - lcm.huber_c)
        return F.mse_loss(prediction, goal)

    def sampling_scheduler(self) -> Any:
        """LCMScheduler on the schedule the student learned: its few steps are picked
        from the solver's timesteps, with the same boundary-condition scaling."""
        import inspect

        from diffusers import LCMScheduler

        accepted = inspect.signature(LCMScheduler.__init__).parameters
        # Only LCMScheduler's own settings: DDPM's (variance_type...) would be carried
        # into the saved config and warned about at every load.
        config = {k: v for k, v in self.scheduler.config.items() if k in accepted}
        return LCMScheduler.from_config(
            config,
            original_inference_steps=self.settings.num_ddim_timesteps,
            timestep_scaling=self.settings.timestep_scaling_factor,
        )


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class Lcm(TrainingMethod):
    """Full distillation: the student is the base UNet given a guidance-scale embedding."""

    def build(self) -> TrainedModules:
        from diffusers import UNet2DConditionModel

        c, lcm = self.components, self.spec.lcm
        assert lcm is not None
        base = c.unet
        self.distillation = Distillation(
            self.spec, self.teacher_folder, base.config, c.noise_scheduler
        )
        for part in (c.vae, *c.text_encoders.values()):
            part.requires_grad_(False)
        if base.config.time_cond_proj_dim is None:
            student = UNet2DConditionModel.from_config(
                base.config, time_cond_proj_dim=lcm.guidance_embedding_dim
            )
            student.load_state_dict(base.state_dict(), strict=False)
            # Zero: the student starts as exactly the base model, whatever the guidance.
            torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
            c.unet = student
        self.embed_dim = c.unet.config.time_cond_proj_dim
        c.unet.requires_grad_(True)
        self.target = copy.deepcopy(c.unet).requires_grad_(False).eval()
        if self.spec.training.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
        return TrainedModules(c.unet, family=c.family)

    def attach(self, encoder: Encoder) -> None:
        self.distillation.attach(encoder)
        self.target.to(encoder.device)  # float32: an EMA with decay near 1 needs the bits

    def loss(self, engine: Any, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        d = self.distillation
        family = self.components.family

        def student(x: Any, t: Any, inputs: Inputs, cond: Any) -> Any:
            return engine(x, t, timestep_cond=cond, **inputs)

        def target(x: Any, t: Any, inputs: Inputs, cond: Any) -> Any:
            with _autocast(d.device, dtype):
                unet_inputs = family.unet_inputs(inputs)
                return self.target(x, t, timestep_cond=cond, **unet_inputs).sample

        return d.loss(batch.latents, batch.text, student, target, self.embed_dim)

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.distillation.teacher}  # the target keeps fp32 (attach)

    def teacher_sampling(self) -> TeacherSampling:
        return self.distillation.sampling()

    def after_step(self, module: TrainedModules) -> None:
        decay = self.spec.lcm.ema_decay if self.spec.lcm else 0.95
        with torch.no_grad():
            for kept, trained in zip(
                self.target.parameters(), module.unet.parameters(), strict=True
            ):
                kept.mul_(decay).add_(trained.detach().float(), alpha=1 - decay)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"target": self.target.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])

    def sampling_scheduler(self) -> Any:
        return self.distillation.sampling_scheduler()

    def save(self, module: TrainedModules, folder: Path) -> list[Path]:
        """A pipeline folder with the student UNet and an LCMScheduler."""
        return save_pipeline(self.components, self.sampling_scheduler(), folder, unet=module.unet)


class LcmLora(Lora):
    """LCM-LoRA: adapters on the base UNet learn the few-step consistency function."""

    def build(self) -> TrainedModules:
        module = super().build()
        self.distillation = Distillation(
            self.spec, self.teacher_folder, module.unet.config, self.components.noise_scheduler
        )
        return module

    def attach(self, encoder: Encoder) -> None:
        self.distillation.attach(encoder)

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.distillation.teacher}

    def teacher_sampling(self) -> TeacherSampling:
        return self.distillation.sampling()

    def loss(self, engine: Any, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        d = self.distillation
        unet = engine.module.unet
        family = self.components.family

        def student(x: Any, t: Any, inputs: Inputs, cond: Any) -> Any:
            return engine(x, t, **inputs)

        def target(x: Any, t: Any, inputs: Inputs, cond: Any) -> Any:
            return unet(x, t, **family.unet_inputs(inputs)).sample

        return d.loss(batch.latents, batch.text, student, target, None)

    def sampling_scheduler(self) -> Any:
        return self.distillation.sampling_scheduler()
