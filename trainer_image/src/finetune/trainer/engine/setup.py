"""What a run is built from, on every rank: the rendezvous, the newest checkpoint (checked
before anything heavy loads), the models and their precision, the data, the DeepSpeed
engine under its ZeRO stage, the sampler; and the state a resume brings back.

`Trainer` (`engine.trainer`) steps the run this sets up.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from finetune.api.common import is_s3
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
from finetune.trainer.data import class_homes
from finetune.trainer.data.batches import open_batches
from finetune.trainer.data.encoding import Encoder
from finetune.trainer.engine.deepspeed_setup import start_engine, trainer_clips
from finetune.trainer.engine.plan import RunPlan
from finetune.trainer.engine.precision import PrecisionPlan
from finetune.trainer.engine.speed import compile_unet, set_matmul_precision, to_channels_last
from finetune.trainer.engine.zero import ZeroChoice, choose_stage, device_memory, weight_bytes
from finetune.trainer.evaluation.scores import Scores, history, settings_basis
from finetune.trainer.evaluation.selection import Selection, from_manifest
from finetune.trainer.evaluation.validation import Evaluation
from finetune.trainer.families import family_named
from finetune.trainer.methods import TrainedModules, TrainingMethod, method_for
from finetune.trainer.models.components import Components, load_components
from finetune.trainer.outputs.generation import GenerationContext
from finetune.trainer.outputs.samples import Sampler
from finetune.trainer.process import distributed
from finetune.trainer.process.stopping import StopRequest
from finetune.trainer.storage.s3 import S3Settings
from finetune.trainer.storage.store import open_store
from finetune.trainer.telemetry.prometheus import TrainerMetrics
from finetune.trainer.telemetry.status import StatusReporter

log = logging.getLogger(__name__)


class RunSetup:
    """A run set up for `Trainer`: each part an attribute, made by `_setup` and
    `_resume` in the order they depend on each other."""

    def __init__(
        self, plan: RunPlan, rank: distributed.Rank, stop: StopRequest | None = None
    ) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.rank = rank
        self.stop = stop or StopRequest()
        self.log_path = plan.work_dir / "train_log.jsonl"
        # Made by `Trainer.run` before the setup, so that a failure in it is reported.
        self.reporter: StatusReporter | None = None
        self.metrics: TrainerMetrics

    def _setup(self) -> None:
        spec, hp = self.spec, self.spec.training
        # The rendezvous waits in C for every rank, maybe for a peer that never comes: a
        # stop there must not wait for it.
        with self.stop.ends_process():
            self.device = distributed.init(self.rank)
        self.precision = PrecisionPlan.of(spec)
        self.dtype = self.precision.compute
        # The validation settings this run's scores and sample grids carry.
        basis = settings_basis(spec)
        self.checkpoints = RunCheckpoints(
            self.plan.work_dir / "checkpoints",
            self.rank,
            self.device,
            spec.checkpointing.keep_last,
            # A local output is the local folder itself: nothing to copy there.
            open_store(self.plan.output_uri, self._s3()) if is_s3(self.plan.output_uri) else None,
            self.reporter.checkpoint if self.reporter is not None else None,
            spec.checkpointing.keep_best,
            record_of=self.plan.work_dir,
            basis=basis,
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
            self.plan.class_homes,
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
            basis,
        )
        self._say_set_aside()
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
            self._alive,
        )
        record = self.checkpoints.record
        self.sampler = Sampler(
            generation,
            self.metrics,
            self.rank.main,
            basis,
            self._evaluation(),
            record.forget if record is not None else None,
        )
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

    def _alive(self) -> None:
        """Rank 0, in work between two steps that moves (a denoising step): the job's
        `lastHeartbeat` moves too."""
        if self.reporter is not None:
            self.reporter.heartbeat()

    def _s3(self) -> S3Settings:
        return S3Settings.of(self.spec.output)

    def _ensure_class_images(self) -> None:
        """Generate the class images a concept lacks with the base model (rank 0), once,
        each sent to the S3 prefix its folder mirrors (with any an earlier run made but
        did not send); then another node's folders fetch them from there."""
        homes = self.plan.class_homes
        if self.rank.main:
            from finetune.trainer.data.class_images import generate_missing

            # DeepSpeed moves the trained modules later; generation needs them now.
            self.components.unet.to(self.device)
            for encoder in self.components.text_encoders.values():
                encoder.to(self.device)
            generate_missing(
                self.spec,
                self.components,
                self.plan.class_folders,
                self.device,
                self.dtype,
                self._alive,
                class_homes.sender(homes, self._s3()),
            )
            for home in homes:
                class_homes.send_missing(home, self._s3())
        distributed.barrier()
        if any(home.uri for home in homes) and self.rank.world > 1:  # the same on every rank
            if self.rank.local_rank == 0 and not self.rank.main:  # another node's first
                for home in homes:
                    class_homes.fetch(home, self._s3())
            distributed.barrier()

    def _checkpoint_loss(self, step: int) -> float | None:
        """On every rank: the loss of the resumed checkpoint's step, as its manifest records
        it (rank 0 reads it); None when the run starts at step 0 or the manifest has none."""
        if step == 0 or self.found is None:
            return None
        loss: float | None = distributed.broadcast(
            loss_of(self.found.folder) if self.rank.main else None
        )
        return loss

    def _say_set_aside(self) -> None:
        """Rank 0, on a resume that changed the validation settings: the earlier scores are
        not weighed against the new ones (`Selection.comparable`), and the log says so."""
        aside = self.selection.set_aside()
        choosing = self.spec.checkpointing.keep_best or self.spec.training.early_stopping
        if aside and choosing and self.rank.main:
            log.warning(
                "the validations of steps %s were scored with other validation settings "
                "(changed since): keepBest, earlyStopping and output.from: best weigh only "
                "the validations scored with this run's",
                ", ".join(map(str, aside)),
            )

    def _latest_scores(self, step: int) -> Scores | None:
        """Rank 0: the scores of the run's last validation up to `step`, from the checkpoint
        or the train log (a finished run's last validation comes after its checkpoint)."""
        if not self.rank.main:
            return None
        known = [*self.selection.history, *history(self.log_path)]
        return max((s for s in known if s.step <= step), key=lambda s: s.step, default=None)
