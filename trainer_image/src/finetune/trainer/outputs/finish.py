"""The end of a finished run: the EMA weights in place, the last samples, the results
saved with their model card, moved into place, uploaded and reported."""

from __future__ import annotations

from typing import Any

from finetune.api.common import is_s3
from finetune.trainer.checkpoints.space import space_checked
from finetune.trainer.engine.plan import RunPlan
from finetune.trainer.evaluation.scores import history
from finetune.trainer.methods import TrainedModules, TrainingMethod
from finetune.trainer.outputs import artifacts, result
from finetune.trainer.outputs.samples import Sampler, Validation
from finetune.trainer.storage.s3 import S3Settings
from finetune.trainer.storage.store import open_store
from finetune.trainer.telemetry.steps import StepTelemetry


def finish_run(
    plan: RunPlan,
    method: TrainingMethod,
    module: TrainedModules,
    ema: Any,
    sampler: Sampler,
    telemetry: StepTelemetry,
    s3: S3Settings,
    step: int,
    last_loss: float | None,
) -> None:
    """Called on every rank once the last step is done (and every checkpoint is durable)."""
    if ema is not None:
        ema.copy_to(module.unet.parameters())
    validation = sampler.at(step) if plan.spec.validation.prompts else Validation()
    if not telemetry.main:
        return
    telemetry.validation(validation.scores)
    work_dir = plan.work_dir
    staging = result.staging_folder(work_dir)
    with space_checked(staging, step):
        method.save(module, staging)
        # The card lists the weights and the samples with their SHA-256 and size.
        listed = artifacts.list_artifacts(staging, "") + [
            a for a in artifacts.list_artifacts(work_dir, "") if a["kind"] == "samples"
        ]
        files = [(a["uri"].lstrip("/"), a["bytes"], a["sha256"]) for a in listed]
        card = result.model_card(
            plan.spec,
            plan.name,
            step,
            last_loss,
            validation.grid,
            work_dir,
            files,
            history(telemetry.log_path),
            pipeline=method.components.family.pipeline_class,
            tag=method.components.family.card_tag,
        )
        (staging / result.MODEL_CARD).write_text(card)
    result.promote(staging, work_dir)
    if is_s3(plan.output_uri):
        result.upload_results(work_dir, open_store(plan.output_uri, s3))
    telemetry.results(artifacts.list_artifacts(work_dir, plan.output_uri))
    print(f"Done: {step} steps; results in {plan.output_uri}", flush=True)
