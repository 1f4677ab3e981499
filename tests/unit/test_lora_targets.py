"""LoRA target names are checked against the model before adapters go on: a name that
matches no module is refused naming the field (PEFT would train the others, or fail with
a traceback when none match), and every default list fits both families."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.api.method_settings import LoraSpec
from finetune.api.methods import ATTENTION_MODULES, LCM_LORA_MODULES
from finetune.trainer.errors import JobInputError
from finetune.trainer.methods.lora import check_targets
from finetune.trainer.models.components import load_components


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl_model"])
def test_the_default_targets_name_modules_of_every_family(
    model: str, request: pytest.FixtureRequest
) -> None:
    components = load_components(request.getfixturevalue(model))
    for targets in (ATTENTION_MODULES, LCM_LORA_MODULES):
        check_targets(components.unet, list(targets), "spec.lora.targetModules", "UNet")
    for name, encoder in components.text_encoders.items():
        targets = LoraSpec().text_encoder_target_modules
        check_targets(encoder, targets, "spec.lora.textEncoderTargetModules", name)


def test_a_target_that_names_no_module_is_refused_naming_the_field(tiny_model: Path) -> None:
    unet = load_components(tiny_model).unet
    with pytest.raises(JobInputError) as refused:
        check_targets(unet, ["to_q", "to_kk"], "spec.lora.targetModules", "UNet")
    message = str(refused.value)
    assert message.startswith("spec.lora.targetModules: the UNet has no module named to_kk;")
    assert "to_k," in message  # what the user probably meant is among the names shown
    assert "to_out.0" in message
