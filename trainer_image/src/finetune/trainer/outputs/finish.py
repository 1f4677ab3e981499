"""The end of a finished run (its last validation made, the chosen weights in place):
the results saved with their model card, moved into place, uploaded and reported."""

from __future__ import annotations

import logging
from collections.abc import Callable

from finetune.api.common import is_s3
from finetune.api.status import MAX_ARTIFACTS
from finetune.trainer.checkpoints.record import RunRecord
from finetune.trainer.checkpoints.space import RESULTS_ADVICE, space_checked
from finetune.trainer.engine.plan import RunPlan
from finetune.trainer.evaluation.scores import history
from finetune.trainer.evaluation.selection import Chosen, Stall
from finetune.trainer.methods import TrainedModules, TrainingMethod
from finetune.trainer.outputs import artifacts, earlier, reproducible, result
from finetune.trainer.outputs.samples import Validation
from finetune.trainer.storage.s3 import S3Settings
from finetune.trainer.storage.store import open_store
from finetune.trainer.telemetry.steps import StepTelemetry

log = logging.getLogger(__name__)


def finish_run(
    plan: RunPlan,
    method: TrainingMethod,
    module: TrainedModules,
    telemetry: StepTelemetry,
    s3: S3Settings,
    step: int,
    last_loss: float | None,
    validation: Validation,
    best: Chosen | None = None,
    check: Callable[[], None] = lambda: None,
    record: RunRecord | None = None,
    stall: Stall | None = None,
) -> None:
    """Called on every rank once the last step is done (and every checkpoint is durable).
    `validation`: the last step's; `best`: with `output.from: best`, the validation whose
    weights `module` holds; `check`: runs while the results upload, and what it raises
    leaves the upload; `record`: the run's record, whose files the output holds already
    are not uploaded again; `stall`: where `training.earlyStopping` ended the run."""
    telemetry.finished()
    if not telemetry.main:
        return
    telemetry.close_board()
    work_dir = plan.work_dir
    grid = validation.grid
    if best is not None and best.scores.step != step:
        best_grid = artifacts.sample_folder(work_dir, best.scores.step) / "grid.png"
        grid = best_grid if best_grid.is_file() else None
    # The samples of the chosen weights' step (and the best's) and the last step's before
    # the others: never the ones a listing's cap cuts.
    first = [best.scores.step] if best is not None else []
    first += [best.gone.step] if best is not None and best.gone is not None else []
    first += [step]
    staging = result.staging_folder(work_dir)
    with space_checked(staging, step, "the results", RESULTS_ADVICE):
        method.save(module, staging)
        reproducible.sort_metadata(staging)  # the same weights, the same SHA-256
        # The card lists every weight file and sample with their SHA-256 and size.
        listed = artifacts.list_artifacts(staging, "", None) + [
            a for a in artifacts.list_artifacts(work_dir, "", None, first) if a["kind"] == "samples"
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
            stall,
            family=method.components.family,
        )
        (staging / result.MODEL_CARD).write_text(card)
    made = {entry.name for entry in staging.iterdir()}
    store = open_store(plan.output_uri, s3) if is_s3(plan.output_uri) else None
    stale = earlier.stale_in_store(store, made) if store is not None else []
    earlier.remove_from_folder(work_dir, made)
    result.promote(staging, work_dir)
    if store is not None:
        result.upload_results(work_dir, store, check, record.holds if record else None)
        earlier.remove_from_store(store, stale)
    results = artifacts.list_artifacts(work_dir, plan.output_uri, None, first)
    if len(results) > MAX_ARTIFACTS:
        log.warning(
            "status.artifacts lists %d of the %d result files (the most a job's status "
            "holds): %d samples of older steps are left out; the model card lists them all",
            MAX_ARTIFACTS,
            len(results),
            len(results) - MAX_ARTIFACTS,
        )
    telemetry.results(results[:MAX_ARTIFACTS])
    print(f"Done: {step} steps; results in {plan.output_uri}{chosen(best)}", flush=True)


def chosen(best: Chosen | None) -> str:
    """The `Done:` line's word on `output.from: best`: whose weights the results are."""
    if best is None:
        return ""
    if best.gone is None:
        return f" (the weights of step {best.scores.step}, the best validation)"
    return (
        f" (the weights of step {best.scores.step}, the best validation whose weights were "
        f"left; step {best.gone.step}'s, the best, were gone)"
    )
