"""The precision plan: one place that decides, per job, which weights are stored in which
dtype and where the forward runs in lower precision.

`mixedPrecision` keeps its meaning for users; what it turns into is decided here:

- `no`: everything in fp32.
- `bf16`: trained weights stay fp32 masters, updated by the torch optimizer itself;
  frozen weights (the base UNet under LoRA, the VAE, frozen text encoders, LCM's
  teacher) are stored in bf16; the engine's forward runs under DeepSpeed's
  `torch_autocast`, frozen models under `torch.autocast`. This is the bare loop's
  recipe: DeepSpeed's own `bf16` mode adds a per-parameter copy into fp32 buffers every
  step, which costs up to half the step on a GPU (benchmarks/README.md).
- `fp16`: DeepSpeed's `fp16` mode with its dynamic loss scaling (autocast's fp16 needs a
  gradient scaler, which DeepSpeed gives only without ZeRO).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.api.hyperparameters import MixedPrecision
from finetune.api.training import TrainingSpec

# Recorded in a checkpoint's layout: a checkpoint of DeepSpeed's `bf16` mode (before the
# plan) holds other optimizer state, so it is refused by name rather than misread.
PLAN_VERSION = "fp32-masters-autocast"


@dataclass(frozen=True)
class PrecisionPlan:
    mixed: MixedPrecision

    @classmethod
    def of(cls, spec: TrainingSpec) -> PrecisionPlan:
        return cls(MixedPrecision(spec.training.mixed_precision))

    @property
    def compute(self) -> torch.dtype:
        """The dtype frozen weights are stored in and micro-batches are cast to."""
        return {MixedPrecision.BF16: torch.bfloat16, MixedPrecision.FP16: torch.float16}.get(
            self.mixed, torch.float32
        )

    @property
    def autocast(self) -> bool:
        return self.mixed == MixedPrecision.BF16

    def deepspeed_config(self) -> dict[str, Any]:
        """The engine config's precision sections."""
        return {
            "bf16": {"enabled": False},
            "fp16": {"enabled": self.mixed == MixedPrecision.FP16},
            "torch_autocast": {"enabled": self.autocast, "dtype": "bfloat16"},
        }

    def layout(self) -> dict[str, Any]:
        """What a checkpoint written under this plan records of it."""
        return {"precisionPlan": PLAN_VERSION} if self.autocast else {}

    def store_models(
        self,
        models: dict[str, nn.Module],
        device: torch.device,
        full_precision: Collection[str] = (),
    ) -> None:
        """Models that only run (VAE, frozen text encoder, teacher) on `device`, stored
        in the compute dtype (fp16 too: DeepSpeed's fp16 mode runs them as such), but
        those named in `full_precision` in float32."""
        for name, model in models.items():
            dtype = torch.float32 if name in full_precision else self.compute
            model.to(device, dtype).eval()

    def store_frozen(self, module: nn.Module) -> None:
        """Frozen weights of the engine's module in the compute dtype; trained ones stay
        fp32 masters (with `fp16` DeepSpeed casts the whole module itself)."""
        if not self.autocast:
            return
        for parameter in module.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(self.compute)

    def describe(self, trained: nn.Module, frozen: dict[str, nn.Module]) -> str:
        """One line for the log: how many tensors of each kind are in which dtype."""
        kinds = {
            "trained": Counter(str(p.dtype) for p in trained.parameters() if p.requires_grad),
            "frozen in the trained modules": Counter(
                str(p.dtype) for p in trained.parameters() if not p.requires_grad
            ),
            **{
                name: Counter(str(p.dtype) for p in model.parameters())
                for name, model in frozen.items()
            },
        }
        parts = [
            f"{kind}: " + ", ".join(f"{n} {dtype.removeprefix('torch.')}" for dtype, n in c.items())
            for kind, c in kinds.items()
            if c
        ]
        where = "under autocast" if self.autocast else "as stored"
        return f"precision plan ({self.mixed}, forward {where}): " + "; ".join(parts)
