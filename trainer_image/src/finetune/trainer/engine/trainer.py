"""The training loop every method shares, driven through DeepSpeed on every rank.

The Trainer sets a run up (models, data, engine), resumes it, and steps it to the
end; what each step reports lives in `telemetry.steps`, the end of a run in
`outputs.finish`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time

import numpy as np
import torch

from finetune.api.common import is_s3
from finetune.api.pod import EXIT_INTERRUPTED, EXIT_OK
from finetune.api.selection import OutputFrom
from finetune.trainer.checkpoints.layout import (
    check_max_steps,
    check_run,
    layout_for,
    run_layout,
    zero_stage_of,
)
from finetune.trainer.checkpoints.manifest import loss_of, validations_of
from finetune.trainer.checkpoints.run_checkpoints import RunCheckpoints
from finetune.trainer.checkpoints.state import TrainingState
from finetune.trainer.data.batches import open_batches
from finetune.trainer.data.encoding import Encoder
from finetune.trainer.engine.deepspeed_setup import start_engine, trainer_clips
from finetune.trainer.engine.plan import RunPlan
from finetune.trainer.engine.precision import PrecisionPlan
from finetune.trainer.engine.speed import (
    CompileReport,
    compile_unet,
    set_matmul_precision,
    to_channels_last,
)
from finetune.trainer.engine.upload_waits import (
    checkpoints_sent,
    left_message,
    results_patience,
)
from finetune.trainer.engine.zero import ZeroChoice, choose_stage, device_memory, weight_bytes
from finetune.trainer.errors import JobInputError, NonFiniteLoss
from finetune.trainer.evaluation.scores import Scores, history
from finetune.trainer.evaluation.selection import Selection, Stall, from_manifest
from finetune.trainer.evaluation.validation import Evaluation
from finetune.trainer.families import family_named
from finetune.trainer.methods import TrainedModules, TrainingMethod, method_for
from finetune.trainer.models.components import Components, load_components
from finetune.trainer.outputs.finish import finish_run
from finetune.trainer.outputs.generation import GenerationContext
from finetune.trainer.outputs.samples import Sampler, Validation
from finetune.trainer.process import distributed
from finetune.trainer.process.stopping import Stopped, StopRequest
from finetune.trainer.storage.s3 import S3Settings
from finetune.trainer.storage.store import open_store
from finetune.trainer.telemetry import prometheus
from finetune.trainer.telemetry.status import StatusReporter
from finetune.trainer.telemetry.steps import StepRecord, StepTelemetry
from finetune.trainer.telemetry.tensorboard import Board, logs_folder

log = logging.getLogger(__name__)

# Test hook: the last rank dies (as if SIGKILLed) right after this step completes.
CRASH_AFTER_STEP_ENV = "FINETUNE_TEST_CRASH_AFTER_STEP"


def check_loss(loss: float, step: int) -> float:
    """`loss` when finite; otherwise the run has diverged and no later step can mend it."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"step {step}: the training loss is {loss}; the run diverged. Lower "
            "spec.training.learningRate (or use bf16 rather than fp16) and run again"
        )
    return loss


class Trainer:
    def __init__(
        self, plan: RunPlan, rank: distributed.Rank, stop: StopRequest | None = None
    ) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.rank = rank
        self.stop = stop or StopRequest()
        self.log_path = plan.work_dir / "train_log.jsonl"
        self.reporter: StatusReporter | None = None

    # --- setup ---------------------------------------------------------------

    def _setup(self) -> None:
        spec, hp = self.spec, self.spec.training
        if spec.deepspeed.zero_stage == 3:
            raise JobInputError(
                "spec.deepspeed.zeroStage: 3 is not supported by the trainer yet; use 2"
            )
        # The rendezvous waits in C for every rank, maybe for a peer that never comes: a
        # stop there must not wait for it.
        with self.stop.ends_process():
            self.device = distributed.init(self.rank)
        self.precision = PrecisionPlan.of(spec)
        self.dtype = self.precision.compute
        self.checkpoints = RunCheckpoints(
            self.plan.work_dir / "checkpoints",
            self.rank,
            self.device,
            spec.checkpointing.keep_last,
            # A local output is the local folder itself: nothing to copy there.
            open_store(self.plan.output_uri, self._s3()) if is_s3(self.plan.output_uri) else None,
            self.reporter.checkpoint if self.reporter is not None else None,
            spec.checkpointing.keep_best,
        )
        self.found = self.checkpoints.newest()
        self._check_resumable()
        # Same seed on every rank while models are built, so adapters start equal.
        torch.manual_seed(hp.seed)
        self.components: Components = load_components(
            self.plan.model_folder, family_named(self.plan.family), self.plan.vae_folder
        )
        self.method: TrainingMethod = method_for(spec, self.components, self.plan.teacher_folder)
        self.module: TrainedModules = self.method.build()
        self.precision.store_models(
            self._frozen_models(),
            self.device,
            # SDXL's own VAE overflows in fp16: kept in float32 where its family says so,
            # unless the job brings a VAE of its own (such as SDXL's fp16-fix VAE).
            full_precision=(
                {"vae"}
                if self.components.family.vae_in_float32 and self.plan.vae_folder is None
                else set()
            ),
        )
        c = self.components
        self.encoder = Encoder(
            c,
            self.device,
            self.dtype,
            text_encoder_trains=bool(self.module.text_encoders),
            cache=spec.data.dataset is None,
            # Concept prompts are the same on every rank; dataset captions are not.
            announce=self.rank.main or spec.data.dataset is not None,
        )
        self.batches = open_batches(
            spec,
            self.plan.concept_folders,
            self.plan.class_folders,
            self.method,
            self.encoder,
            self.rank,
            self._s3(),
            self._ensure_class_images,
        )
        self.method.attach(self.encoder)
        # Only now: class images (above) are generated with the UNet as it was built.
        self.precision.store_frozen(self.module)
        compile_unet(hp, self.module)
        set_matmul_precision(hp, self.device)
        # Rank 0's validations so far: those the resumed checkpoint carries.
        self.selection = Selection(
            spec,
            from_manifest(validations_of(self.found.folder))
            if self.found is not None and self.rank.main
            else [],
        )
        self.zero = self._zero_stage()
        groups = self.method.parameter_groups(self.module)
        self.engine, self.scheduler = start_engine(
            spec, self.module, groups, self.rank.world, self.zero.stage, self.device
        )
        # What the trainer clips where DeepSpeed does not (`trainer_clips`).
        self.clipped = (
            [p for group in groups for p in group["params"]]
            if trainer_clips(spec, self.zero.stage)
            else None
        )
        if hp.channels_last:
            layout = to_channels_last(self.module.unet, trained_too=self.zero.stage == 0)
            if self.rank.main:
                log.info(layout)
        if self.rank.main:  # read back from the engine: what it trains is what is logged
            log.info(self.precision.describe(self.engine.module, self._frozen_models()))
            log.info(self.zero.describe())
            prediction = self.components.noise_scheduler.config.prediction_type
            log.info("the UNet predicts %s (its scheduler's config): the loss's target", prediction)
        generation = GenerationContext(
            spec,
            self.plan.work_dir,
            self.components,
            self.method,
            self.module,
            self.device,
            self.dtype,
            self.stop,
        )
        self.sampler = Sampler(generation, self.metrics, self.rank.main, self._evaluation())
        self.ema = None
        if hp.ema.enabled:
            from diffusers.training_utils import EMAModel

            # Shadow weights in float32: in bf16 an EMA update rounds away to nothing.
            shadow = [p.detach().float().clone() for p in self.module.unet.parameters()]
            self.ema = EMAModel(shadow, decay=hp.ema.decay)
            self.ema.to(self.device)
        # Each rank draws its own noise from here on.
        random.seed(hp.seed + self.rank.rank)
        np.random.seed((hp.seed + self.rank.rank) % 2**32)
        torch.manual_seed(hp.seed + self.rank.rank)

    def _check_resumable(self) -> None:
        """Before the model loads (and class images are made): refuse the newest checkpoint
        when this run cannot continue it, for its step, settings or models. What only the
        engine knows (its ZeRO stage, its precision) is checked in `_resume`."""
        if self.found is None:
            return
        where = self.checkpoints.location(self.found.tag)
        check_max_steps(self.found, self.spec.training.max_steps, where)
        layout = run_layout(self.spec, self.rank.world, self.plan.model_fingerprints)
        if not check_run(self.found, layout, where) and self.rank.main:
            log.warning(
                "%s records no fingerprint of the models it was trained on (an earlier "
                "trainer wrote it): the model could not be checked against it",
                where,
            )

    def _zero_stage(self) -> ZeroChoice:
        """Rank 0's choice, on every rank: nodes may differ in memory, the engines may not."""
        state_bytes, frozen_bytes = weight_bytes(self.module, self._frozen_models().values())
        ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        choice = choose_stage(
            self.spec.deepspeed.zero_stage,
            resumed=zero_stage_of(self.found) if self.found is not None else None,
            offload_optimizer=self.spec.deepspeed.offload_optimizer,
            state_bytes=state_bytes,
            frozen_bytes=frozen_bytes,
            memory=device_memory(self.device, ranks_on_node),
            world=self.rank.world,
            where="the GPU" if self.device.type == "cuda" else "this rank's share of host memory",
        )
        chosen: ZeroChoice = distributed.broadcast(choice)
        return chosen

    def _resume(self) -> int:
        """The step to go on from: the newest checkpoint loaded, or 0."""
        return self.checkpoints.resume(
            self.found,
            TrainingState(self.engine, self.batches, self.method, self.ema),
            {
                **layout_for(
                    self.spec, self.rank.world, self.zero.stage, self.plan.model_fingerprints
                ),
                **self.precision.layout(),
            },
        )

    def _evaluation(self) -> Evaluation | None:
        """Rank 0 scores the validation samples, when the job asks for metrics."""
        if not (self.rank.main and self.spec.validation.metrics):
            return None
        plan = self.plan
        return Evaluation(
            self.spec,
            plan.concept_folders,
            plan.clip_folder,
            plan.dino_folder,
            self.device,
            plan.class_folders,
        )

    def _frozen_models(self) -> dict[str, torch.nn.Module]:
        c = self.components
        text_encoders = {
            name.replace("_", " "): encoder
            for name, encoder in c.text_encoders.items()
            if name not in self.module.text_encoders
        }
        return {"vae": c.vae, **text_encoders, **self.method.frozen_models()}

    def _s3(self) -> S3Settings:
        return S3Settings.of(self.spec.output)

    def _ensure_class_images(self) -> None:
        """Generate the class images a concept lacks with the base model (rank 0), once."""
        if self.rank.main:
            from finetune.trainer.data.class_images import generate_missing

            # DeepSpeed moves the trained modules later; generation needs them now.
            self.components.unet.to(self.device)
            for encoder in self.components.text_encoders.values():
                encoder.to(self.device)
            generate_missing(
                self.spec, self.components, self.plan.class_folders, self.device, self.dtype
            )
        distributed.barrier()

    # --- the loop -------------------------------------------------------------

    def run(self) -> int:
        # Rank 0 alone reports (in a pod); whatever way the run ends, what is
        # pending still goes out.
        self.reporter = StatusReporter.from_env() if self.rank.main else None
        self.metrics = prometheus.start(
            self.plan.name, str(self.spec.method), self.rank.rank, self.rank.local_rank
        )
        try:
            return self._run()
        finally:
            if self.reporter is not None:
                self.reporter.close()

    def _run(self) -> int:
        # Nothing to save yet: a stop while models load, class images are generated or
        # a checkpoint is fetched ends the process at once (`Stopped`, exit 130).
        with self.stop.interruptible():
            self._setup()
            step = self._resume()
        hp = self.spec.training
        interval = self.spec.checkpointing.every_n_steps
        assert interval is not None, "TrainingSpec resolves the checkpoint interval"
        crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "0"))
        telemetry = self.telemetry = StepTelemetry(
            self.metrics,
            self.reporter,
            self.log_path,
            self.device,
            self.rank.main,
            hp.max_steps,
            step,
            Board(logs_folder(self.plan.work_dir), step) if self.rank.main else None,
        )
        compiling = CompileReport(hp.compile, self.rank.main)
        self.resumed_step = step
        # The checkpoint's: a run that trains no step (run again after it finished) reports it.
        last_loss = self._checkpoint_loss(step)
        if step > 0:
            telemetry.resumed(step, last_loss, self._latest_scores(step))
        # keepBest: every validation's weights are in a checkpoint, to be kept if best.
        checkpoint_validations = self.spec.checkpointing.keep_best is not None
        if step < hp.max_steps and self._stops_early(step):  # it had stopped before a resume
            telemetry.close_progress()
            return self._finish(step, last_loss)
        self.engine.train()
        while step < hp.max_steps:
            record = self._train_step(step)
            step, last_loss = record.step, record.loss
            telemetry.step(record)
            compiling.step_done(record.step, record.seconds)
            # A stop asked for on the last step lets the job finish instead.
            stopping = (
                distributed.any_rank(self.stop.requested, self.device) and step < hp.max_steps
            )
            # Validated before the checkpoint, so that its manifest carries the scores.
            validation = self._validate(step) if not stopping and self.sampler.due(step) else None
            if step % interval == 0 or stopping or (validation and checkpoint_validations):
                saving = time.perf_counter()
                folder = self.checkpoints.save(step, self.selection.manifest_entries(), last_loss)
                telemetry.checkpoint_saved(time.perf_counter() - saving, folder)
            self.checkpoints.poll()
            telemetry.uploads(self.checkpoints.uploads)
            if crash_after and step == crash_after and self.rank.rank == self.rank.world - 1:
                os._exit(1)
            if stopping:
                return self._stopped(step)
            if validation is not None and self._stops_early(step):
                telemetry.close_progress()
                return self._finish(step, last_loss, validation)
        telemetry.close_progress()
        return self._finish(step, last_loss)

    def _checkpoint_loss(self, step: int) -> float | None:
        """On every rank: the loss of the resumed checkpoint's step, as its manifest records
        it (rank 0 reads it); None when the run starts at step 0 or the manifest has none."""
        if step == 0 or self.found is None:
            return None
        loss: float | None = distributed.broadcast(
            loss_of(self.found.folder) if self.rank.main else None
        )
        return loss

    def _latest_scores(self, step: int) -> Scores | None:
        """Rank 0: the scores of the run's last validation up to `step`, from the checkpoint
        or the train log (a finished run's last validation comes after its checkpoint)."""
        if not self.rank.main:
            return None
        known = [*self.selection.history, *history(self.log_path)]
        return max((s for s in known if s.step <= step), key=lambda s: s.step, default=None)

    def _validation_made(self, step: int) -> Validation | None:
        """On every rank, in a run that trains no step (the same command run again after
        the run finished or stopped early): the validation of `step` the earlier run made
        and logged, reused as it is, not made and logged again; None where that run ended
        before it (it is then made as usual)."""
        made = None
        if self.rank.main:
            logged = [s for s in history(self.log_path) if s.step == step]
            made = self.sampler.made(step, logged[-1] if logged else None)
        if not distributed.broadcast(made is not None):
            return None
        if made is None:  # another rank: rank 0 holds the grid and scores
            return Validation()
        if made.scores is not None:  # `output.from: best` weighs it as the first run did
            self.selection.add(made.scores)
        return made

    def _validate(self, step: int) -> Validation:
        """Samples of `step` on every rank together; rank 0 reports them and keeps the scores."""
        validation = self.sampler.at(step)
        self.telemetry.validation(
            step, validation.scores, validation.grid, validation.distillation_grid
        )
        if validation.scores is not None:
            self.selection.add(validation.scores)
        return validation

    def _stops_early(self, step: int) -> bool:
        """On every rank, after a validation: whether `training.earlyStopping` ends the run
        (rank 0's scores decide); rank 0 says so everywhere it reports."""
        if self.spec.training.early_stopping is None:
            return False
        stall: Stall | None = distributed.broadcast(
            self.selection.stall() if self.rank.main else None
        )
        if stall is None:
            return False
        self.telemetry.early_stop(step, stall, self.spec.training.early_stopping)
        return True

    def _train_step(self, step: int) -> StepRecord:
        """Optimizer step `step + 1`: its micro-batches, the method's and EMA's updates."""
        hp = self.spec.training
        started = time.perf_counter()
        losses = []
        for micro in range(hp.gradient_accumulation_steps):
            batch = self.batches.batch(step * hp.gradient_accumulation_steps + micro)
            loss = self.method.loss(self.engine, batch, self.dtype)
            self.engine.backward(loss)
            if self.clipped is not None and self.engine.is_gradient_accumulation_boundary():
                torch.nn.utils.clip_grad_norm_(self.clipped, hp.max_grad_norm)
            self.engine.step()
            losses.append(float(loss.detach()))
        step += 1
        self.method.after_step(self.module)
        if self.ema is not None:
            self.ema.step(self.module.unet.parameters())
        mean_loss = check_loss(distributed.mean(sum(losses) / len(losses), self.device), step)
        return StepRecord(
            step=step,
            total_steps=hp.max_steps,
            loss=mean_loss,
            learning_rate=self.scheduler.get_last_lr()[0] if self.scheduler is not None else None,
            seconds=time.perf_counter() - started,
            images=hp.batch_size * hp.gradient_accumulation_steps * self.rank.world,
        )

    def _stopped(self, step: int) -> int:
        """After the checkpoint of a stop: every upload done (or left by a second stop),
        then exit 130."""
        self.telemetry.close_progress()
        self.telemetry.close_board()
        sent = self._checkpoints_sent()
        if self.rank.main:
            print(
                f"Stopped at step {step}; checkpoint saved. Run the same command to resume."
                if sent
                else left_message(step, self.checkpoints),
                flush=True,
            )
        return EXIT_INTERRUPTED

    def _checkpoints_sent(self) -> bool:
        return checkpoints_sent(self.checkpoints, self.stop, self.plan.output_uri, self.rank.main)

    def _finish(
        self, step: int, last_loss: float | None, validation: Validation | None = None
    ) -> int:
        """The results of `step` (the last, or an early stop's); `validation`: its own,
        when the loop made it. Exit 0, or 130 where a second stop left an upload."""
        if not self._checkpoints_sent():  # every checkpoint counts before the results
            if self.rank.main:
                print(left_message(step, self.checkpoints), flush=True)
            return EXIT_INTERRUPTED
        self.telemetry.uploads(self.checkpoints.uploads)
        if self.ema is not None:
            self.ema.copy_to(self.module.unet.parameters())
        if validation is None and self.spec.validation.prompts:
            if step == self.resumed_step:
                validation = self._validation_made(step)
            if validation is None:
                validation = self._validate(step)
        best = self._best_weights(step)
        code = EXIT_OK
        try:
            finish_run(
                self.plan,
                self.method,
                self.module,
                self.telemetry,
                self._s3(),
                step,
                last_loss,
                validation or Validation(),
                best,
                results_patience(self.stop, self.plan.output_uri).check,
            )
        except Stopped:  # rank 0 alone uploads; the others wait at the barrier below
            print(
                f"Stopped after step {step}: the results' upload was left. Run the same "
                "command to finish the run.",
                flush=True,
            )
            code = EXIT_INTERRUPTED
        distributed.barrier()
        return code

    def _best_weights(self, step: int) -> Scores | None:
        """`output.from: best`, on every rank: the best validation's scores, its
        checkpoint's weights loaded unless they are the last step's; None for the last
        step's weights."""
        if self.spec.output.from_ != OutputFrom.BEST:
            return None
        best: Scores | None = distributed.broadcast(
            self.selection.best() if self.rank.main else None
        )
        if best is None or best.step == step or self.checkpoints.load(best.step):
            return best
        if self.rank.main:
            log.warning(
                "the checkpoint of step %d, the best validation, is gone; the result is "
                "the weights of step %d",
                best.step,
                step,
            )
        return None
