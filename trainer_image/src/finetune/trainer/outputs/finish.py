"""The end of a finished run (its last validation made, the chosen weights in place):
the results saved with their model card, moved into place, uploaded and reported."""

from __future__ import annotations

from collections.abc import Callable

from finetune.api.common import is_s3
from finetune.trainer.checkpoints.record import RunRecord
from finetune.trainer.checkpoints.space import space_checked
from finetune.trainer.engine.plan import RunPlan
from finetune.trainer.evaluation.scores import Scores, history
from finetune.trainer.methods import TrainedModules, TrainingMethod
from finetune.trainer.outputs import artifacts, reproducible, result
from finetune.trainer.outputs.samples import Validation, sample_folder
from finetune.trainer.storage.s3 import S3Settings
from finetune.trainer.storage.store import open_store
from finetune.trainer.telemetry.steps import StepTelemetry


def finish_run(
    plan: RunPlan,
    method: TrainingMethod,
    module: TrainedModules,
    telemetry: StepTelemetry,
    s3: S3Settings,
    step: int,
    last_loss: float | None,
    validation: Validation,
    best: Scores | None = None,
    check: Callable[[], None] = lambda: None,
    record: RunRecord | None = None,
) -> None:
    """Called on every rank once the last step is done (and every checkpoint is durable).
    `validation`: the last step's; `best`: with `output.from: best`, the validation whose
    weights `module` holds; `check`: runs while the results upload, and what it raises
    leaves the upload; `record`: the run's record, whose files the output holds already
    are not uploaded again."""
    telemetry.finished()
    if not telemetry.main:
        return
    telemetry.close_board()
    work_dir = plan.work_dir
    grid = validation.grid
    if best is not None and best.step != step:
        best_grid = sample_folder(work_dir, best.step) / "grid.png"
        grid = best_grid if best_grid.is_file() else None
    staging = result.staging_folder(work_dir)
    with space_checked(staging, step):
        method.save(module, staging)
        reproducible.sort_metadata(staging)  # the same weights, the same SHA-256
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
            grid,
            work_dir,
            files,
            history(telemetry.log_path),
            best,
            family=method.components.family,
        )
        (staging / result.MODEL_CARD).write_text(card)
    result.promote(staging, work_dir)
    if is_s3(plan.output_uri):
        store = open_store(plan.output_uri, s3)
        result.upload_results(work_dir, store, check, record.holds if record else None)
    telemetry.results(artifacts.list_artifacts(work_dir, plan.output_uri))
    chosen = f" (the weights of step {best.step}, the best validation)" if best is not None else ""
    print(f"Done: {step} steps; results in {plan.output_uri}{chosen}", flush=True)
