"""Speed settings beyond the bare loop: TF32 matmuls, channels-last convolutions, fused
AdamW and `torch.compile` of the UNet. Each is a GPU matter; on CPUs they are left off
(or cost nothing), so CPU runs stay the reference the tests compare against."""

from __future__ import annotations

import logging

import torch
from torch import nn

from finetune.api.hyperparameters import Hyperparameters
from finetune.trainer.methods import TrainedModules

log = logging.getLogger(__name__)


def set_matmul_precision(hp: Hyperparameters, device: torch.device) -> None:
    """TF32 for the matmuls and convolutions that run in fp32 (Ampere or newer)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = hp.allow_tf32
        torch.backends.cudnn.allow_tf32 = hp.allow_tf32


def fused_optimizer(device: torch.device) -> bool:
    """AdamW's one-kernel-per-step implementation, where every trained tensor is a GPU's."""
    return device.type == "cuda"


def compile_unet(hp: Hyperparameters, module: TrainedModules) -> None:
    """Compile the UNet in place, before the engine wraps it: its parameter names (and so
    checkpoints and outputs) stay as they are."""
    if hp.compile:
        module.unet.compile()


def to_channels_last(unet: nn.Module, trained_too: bool) -> str:
    """Convolution weights channels-last, once the engine has started (its first
    broadcast reads every weight as contiguous bytes); what was moved, in words.

    Trained weights only when the optimizer holds them as they are (ZeRO-0): ZeRO-1/2
    keep them as views of flat buffers, which a new layout would cut them off from."""
    moved = 0
    for parameter in unet.parameters():
        if parameter.dim() == 4 and (trained_too or not parameter.requires_grad):
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
            moved += 1
    which = "trained and frozen" if trained_too else "frozen (ZeRO-1/2 keep trained ones flat)"
    return f"channels-last: {moved} {which} convolution weights of the UNet"


class CompileReport:
    """Logs, once, how long the first step took when the UNet is compiled: compilation
    happens inside it, so it is reported apart from the step time the ETA is made of."""

    def __init__(self, enabled: bool, main: bool) -> None:
        self._pending = enabled and main

    def step_done(self, step: int, seconds: float) -> None:
        if self._pending:
            self._pending = False
            log.info(
                "torch.compile: step %d took %.1f s, compiling the UNet included; "
                "later steps run the compiled code",
                step,
                seconds,
            )
