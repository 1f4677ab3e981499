"""What a checkpoint holds: DeepSpeed's engine (model, optimizer, scheduler), each
rank's RNGs and data position, the EMA weights and the training method's own state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.trainer.checkpoints.rng import restore_rng, rng_file, rng_state

if TYPE_CHECKING:
    from finetune.trainer.data.batches import Batches
    from finetune.trainer.methods import TrainingMethod

# The method's own state in a checkpoint (the LCM target network).
METHOD_STATE = "method.pt"
EMA_STATE = "ema.pt"


def data_file(rank: int) -> str:
    """Each rank's data-stream state in a checkpoint."""
    return f"data-rank{rank:04d}.json"


@dataclass
class TrainingState:
    engine: Any  # deepspeed's DeepSpeedEngine
    batches: Batches
    method: TrainingMethod
    ema: Any | None  # diffusers' EMAModel, when the job keeps one

    def save(self, root: Path, tag: str, step: int, rank: int) -> None:
        """On every rank (DeepSpeed collects from all of them); rank 0 alone writes
        what every rank holds alike."""
        folder = root / tag
        self.engine.save_checkpoint(
            str(root),
            tag=tag,
            client_state={"step": step},
            save_latest=False,
            exclude_frozen_parameters=True,
        )
        torch.save(rng_state(), rng_file(folder, rank))
        data_state = self.batches.state()
        if data_state:
            (folder / data_file(rank)).write_text(json.dumps(data_state))
        if self.ema is not None and rank == 0:
            torch.save(self.ema.state_dict(), folder / EMA_STATE)
        method_state = self.method.checkpoint_state()
        if method_state is not None and rank == 0:
            torch.save(method_state, folder / METHOD_STATE)

    def load(self, root: Path, tag: str, rank: int, device: torch.device) -> None:
        folder = root / tag
        self.engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
        restore_rng(torch.load(rng_file(folder, rank), weights_only=False))
        data_state = folder / data_file(rank)
        if data_state.exists():
            self.batches.load_state(json.loads(data_state.read_text()))
        if self.ema is not None:
            self.ema.load_state_dict(
                torch.load(folder / EMA_STATE, map_location=device, weights_only=False)
            )
        if (folder / METHOD_STATE).exists():
            self.method.load_checkpoint_state(
                torch.load(folder / METHOD_STATE, map_location=device, weights_only=False)
            )
