"""Who this process is in the gang, and the few collective operations the loop needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class Rank:
    rank: int
    local_rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Rank:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world=int(os.environ.get("WORLD_SIZE", "1")),
        )


def init(rank: Rank) -> torch.device:
    """Start the process group (NCCL on GPUs, gloo on CPUs) and pick this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from finetune.trainer.engine.comm_op import build_comm_op

    build_comm_op()  # where a killed build cannot leave every later start waiting
    accelerator = get_accelerator()
    # Ranks wait at barriers while rank 0 alone generates class images, samples and
    # uploads results: far longer than the default 10 minutes on a big job.
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(), timeout=COLLECTIVE_TIMEOUT
    )
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(rank.local_rank)
        return torch.device("cuda", rank.local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def minimum(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value`."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
