"""Which ZeRO stage a run trains under, and why, when the job leaves it to the trainer.

ZeRO-1/2 partition gradients and optimizer state over the ranks, at a price: DeepSpeed's
partitioned optimizer flattens and copies ~700 tensors a step for SD 1.5, up to half the
step on a GPU (benchmarks/README.md). ZeRO-0 lets the torch optimizer step the weights
directly, at the bare loop's speed. So ZeRO-0 whenever the weights and the optimizer state
fit comfortably in one device's memory; ZeRO-2 when they do not and there are ranks to
share them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# fp32 weight, fp32 gradient and Adam's two fp32 moments per trained parameter.
TRAINED_BYTES = 4 + 4 + 8
# What weights and optimizer state may take of a device's memory: the rest is for
# activations, which grow with batch size and resolution and are not known here.
SHARE_FOR_STATE = 0.5
GIB = 2**30


@dataclass(frozen=True)
class ZeroChoice:
    stage: int
    reason: str

    def describe(self) -> str:
        return f"ZeRO stage {self.stage}: {self.reason}"


def device_memory(device: torch.device, ranks_on_node: int) -> int:
    """Bytes one rank may count on: its GPU's, or its share of the host's."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(ranks_on_node, 1)


def weight_bytes(trained: nn.Module, frozen: Iterable[nn.Module]) -> tuple[int, int]:
    """(weights and optimizer state of what trains, frozen weights as stored)."""
    trained_count = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    frozen_bytes = sum(
        p.numel() * p.element_size() for p in trained.parameters() if not p.requires_grad
    )
    frozen_bytes += sum(
        p.numel() * p.element_size() for model in frozen for p in model.parameters()
    )
    return trained_count * TRAINED_BYTES, frozen_bytes


def choose_stage(
    requested: int | None,
    *,
    resumed: int | None,
    offload_optimizer: bool,
    state_bytes: int,
    frozen_bytes: int,
    memory: int,
    world: int,
    where: str,
) -> ZeroChoice:
    """The stage to train under. `resumed`: the stage of the checkpoint the run goes on
    from (its optimizer state is laid out for that stage); `where`: the device, in words."""
    if requested is not None:
        return ZeroChoice(requested, "set by spec.deepspeed.zeroStage")
    if resumed is not None:
        return ZeroChoice(resumed, f"the checkpoint being resumed was written under ZeRO-{resumed}")
    if offload_optimizer:
        return ZeroChoice(
            2, "spec.deepspeed.offloadOptimizer keeps the optimizer state in CPU memory"
        )
    need = state_bytes + frozen_bytes
    sizes = (
        f"trained weights with their gradients and Adam state {state_bytes / GIB:.2f} GiB "
        f"+ frozen weights {frozen_bytes / GIB:.2f} GiB"
    )
    budget = f"half of {where}'s {memory / GIB:.1f} GiB"
    if need <= SHARE_FOR_STATE * memory:
        return ZeroChoice(0, f"{sizes} fit in {budget}; the optimizer steps the weights directly")
    if world == 1:
        return ZeroChoice(
            0,
            f"{sizes} exceed {budget}, but with one rank there is nothing to partition; "
            "if memory runs out, set spec.deepspeed.offloadOptimizer or train LoRA",
        )
    return ZeroChoice(
        2, f"{sizes} exceed {budget}; gradients and optimizer state are split over {world} ranks"
    )


def zero2_tuning(device: torch.device) -> dict[str, object]:
    """ZeRO-2's communication settings. On GPUs the reduction overlaps the backward in a
    side stream; gloo on CPUs has no streams to overlap with."""
    return {
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "overlap_comm": device.type == "cuda",
    }
