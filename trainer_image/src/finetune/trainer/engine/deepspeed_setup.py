"""The DeepSpeed engine a run trains through: its config, optimizer, schedule and precision.

`deepspeed.initialize` is used directly rather than through accelerate: on CPU
(gloo) accelerate 1.15 misreports the world when DeepSpeed is on, while the
engine's own backward/step/save_checkpoint behave alike on CPUs and GPUs, so
CI exercises the very path users run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from finetune.api.hyperparameters import MixedPrecision, Optimizer
from finetune.api.training import TrainingSpec
from finetune.trainer.engine.precision import PrecisionPlan
from finetune.trainer.engine.speed import fused_optimizer
from finetune.trainer.engine.zero import zero2_tuning
from finetune.trainer.errors import JobInputError


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def trainer_clips(spec: TrainingSpec, stage: int) -> bool:
    """Whether the trainer clips gradients itself, over the trained parameters only: under
    ZeRO-0 without fp16's loss scaling, where DeepSpeed would walk every parameter of the
    module (a frozen UNet's included) each step to find the few with gradients. ZeRO-1/2
    partition the gradients and fp16 scales them: there DeepSpeed clips."""
    return stage == 0 and spec.training.mixed_precision != MixedPrecision.FP16


def deepspeed_config(
    spec: TrainingSpec, world: int, stage: int, device: torch.device
) -> dict[str, Any]:
    hp, ds = spec.training, spec.deepspeed
    zero: dict[str, Any] = {"stage": stage, **(zero2_tuning(device) if stage == 2 else {})}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "train_batch_size": hp.batch_size * hp.gradient_accumulation_steps * world,
        "gradient_clipping": 0.0 if trainer_clips(spec, stage) else hp.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        **PrecisionPlan.of(spec).deepspeed_config(),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.config or {})


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise JobInputError(
            "spec.training.optimizer: adamw8bit needs bitsandbytes, which is not installed; use adamw"
        ) from None
    return bitsandbytes


def check_optimizer(spec: TrainingSpec) -> None:
    """Fail before any worker starts when the optimizer's library is missing."""
    if spec.training.optimizer == Optimizer.ADAMW_8BIT:
        _bitsandbytes()


def make_optimizer(
    spec: TrainingSpec, groups: list[dict[str, Any]], device: torch.device
) -> torch.optim.Optimizer:
    hp = spec.training
    # A validated spec always has one: the method's default when the job names none.
    assert hp.learning_rate is not None, "TrainingSpec resolves the method's learning rate"
    settings: dict[str, Any] = {
        "lr": hp.learning_rate,
        "betas": (hp.adam_beta1, hp.adam_beta2),
        "weight_decay": hp.adam_weight_decay,
        "eps": hp.adam_epsilon,
    }
    if hp.optimizer == Optimizer.ADAMW_8BIT:
        return _bitsandbytes().optim.AdamW8bit(groups, **settings)  # type: ignore[no-any-return]
    # Offloaded, the state and so the step are on the CPU. None, not False, otherwise:
    # torch picks its multi-tensor (foreach) step only when `fused` is left unset.
    fused = fused_optimizer(device) and not spec.deepspeed.offload_optimizer
    return torch.optim.AdamW(groups, **settings, fused=True if fused else None)


def start_engine(
    spec: TrainingSpec,
    module: nn.Module,
    groups: list[dict[str, Any]],
    world: int,
    stage: int,
    device: torch.device,
) -> tuple[Any, Any]:
    """The DeepSpeed engine that trains `module`, and its learning-rate scheduler."""
    import deepspeed
    from diffusers.optimization import get_scheduler

    hp = spec.training

    def scheduler(optimizer: torch.optim.Optimizer) -> Any:
        return get_scheduler(
            hp.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=hp.lr_warmup_steps,
            num_training_steps=hp.max_steps,
            num_cycles=hp.lr_num_cycles,
            power=hp.lr_power,
        )

    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=module,
        optimizer=make_optimizer(spec, groups, device),
        lr_scheduler=scheduler,
        config=deepspeed_config(spec, world, stage, device),
    )
    if world == 1 and stage == 0:
        # One rank has nothing to reduce, but DeepSpeed would still copy every gradient
        # into flat buffers, "all-reduce" them and copy them back after each backward.
        engine.enable_backward_allreduce = False
    return engine, lr_scheduler
