"""LoRA: adapters on the UNet's attention (and optionally the text encoders')."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.api.outputs import OutputFormat
from finetune.trainer.errors import JobInputError
from finetune.trainer.methods.base import TrainedModules, TrainingMethod

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


def check_targets(model: torch.nn.Module, targets: list[str], field: str, what: str) -> None:
    """Refuse target names that match no module of `model` (PEFT's rule: the module's
    whole name, or its last dotted parts). PEFT itself refuses only a list of which
    nothing matches, and with a traceback; one typo among good names would train less."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        layers = (torch.nn.Linear, torch.nn.Conv2d)
        leaves = sorted(
            {_short(name) for name, m in model.named_modules() if isinstance(m, layers)}
        )
        raise JobInputError(
            f"{field}: the {what} has no module named {', '.join(missing)}; its layers "
            f"are named e.g. {', '.join(leaves[:20])}"
        )


def _short(name: str) -> str:
    """A layer's name as target lists give it: its last part, with its parent's where
    the last is an index (`to_out.0`)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


class Lora(TrainingMethod):
    def _config(self, target_modules: list[str]) -> object:
        from peft import LoraConfig

        lora = self.spec.lora
        assert lora is not None
        assert lora.rank is not None  # filled by the API's method defaults
        return LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            init_lora_weights="gaussian",
            target_modules=target_modules,
        )

    def build(self) -> TrainedModules:
        lora = self.spec.lora
        assert lora is not None
        assert lora.target_modules is not None  # filled by the API's method defaults
        c = self.components
        for part in (c.unet, c.vae, *c.text_encoders.values()):
            part.requires_grad_(False)
        check_targets(c.unet, lora.target_modules, "spec.lora.targetModules", "UNet")
        c.unet.add_adapter(self._config(lora.target_modules))
        text_encoders = c.text_encoders if self.trains_text_encoder else {}
        for name, encoder in text_encoders.items():
            check_targets(
                encoder,
                lora.text_encoder_target_modules,
                "spec.lora.textEncoderTargetModules",
                name.replace("_", " "),
            )
            encoder.add_adapter(self._config(lora.text_encoder_target_modules))
        # Adapters train in float32 whatever the base weights' dtype.
        for module in (c.unet, *text_encoders.values()):
            for param in module.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        if self.spec.training.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
            for encoder in text_encoders.values():
                encoder.gradient_checkpointing_enable()
        return TrainedModules(c.unet, family=c.family, **text_encoders)

    def adapter_state(self, module: TrainedModules) -> dict[str, dict[str, torch.Tensor]]:
        """The adapters in PEFT's key format, as float32 on the CPU."""
        from peft.utils import get_peft_model_state_dict

        parts = {"unet": get_peft_model_state_dict(module.unet)}
        for name, encoder in module.text_encoders.items():
            parts[name] = get_peft_model_state_dict(encoder)
        return {
            name: {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
            for name, sd in parts.items()
        }

    def save(self, module: TrainedModules, folder: Path) -> list[Path]:
        from diffusers.utils import convert_state_dict_to_kohya
        from safetensors.torch import save_file

        lora = self.spec.lora
        assert lora is not None
        assert lora.alpha is not None  # TrainingSpec resolves it: `rank` by default
        state = self.adapter_state(module)
        metadata = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": lora.target_modules}
        te_metadata = {**metadata, "target_modules": lora.text_encoder_target_modules}
        # diffusers' own layout: `unet.`/`text_encoder.`(/`text_encoder_2.`) + PEFT's
        # module keys (lora_A, lora_B), never the `base_model.model.` keys of a PEFT
        # wrapper. Its older `lora.down`/`lora.up` names cover attention layers only: a
        # file mixing both (lcmLora adapts convolutions too) loads without its attention
        # adapters.
        self.components.family.save_lora(
            folder, state, {part: metadata if part == "unet" else te_metadata for part in state}
        )
        written = [folder / LORA_FILE]
        if OutputFormat.KOHYA in self.spec.output.formats:
            # diffusers names the parts `lora_unet_`, `lora_te1_` and `lora_te2_`.
            prefixed = {
                f"{name}.{key}": value for name, sd in state.items() for key, value in sd.items()
            }
            kohya = convert_state_dict_to_kohya(prefixed)
            for key in kohya:
                if key.endswith(".alpha"):
                    kohya[key] = torch.tensor(float(lora.alpha))
            save_file(kohya, folder / KOHYA_FILE, metadata={"ss_network_dim": str(lora.rank)})
            written.append(folder / KOHYA_FILE)
        return written
