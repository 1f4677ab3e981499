"""The training loop every method shares, driven through DeepSpeed on every rank.

`deepspeed.initialize` is used directly rather than through accelerate: on CPU
(gloo) accelerate 1.15 misreports the world when DeepSpeed is on, while the
engine's own backward/step/save_checkpoint behave alike on CPUs and GPUs, so
CI exercises the very path users run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.api.common import is_s3
from finetune.api.pod import EXIT_INTERRUPTED, EXIT_OK
from finetune.api.training import MixedPrecision, Optimizer, TrainingSpec
from finetune.trainer.checkpoints import manifest
from finetune.trainer.checkpoints.durable import DurableCheckpoints
from finetune.trainer.data.batches import Batches, CaptionBatches, ConceptBatches
from finetune.trainer.data.captions import open_stream
from finetune.trainer.data.concepts import Example, examples_from
from finetune.trainer.data.encoding import Encoder
from finetune.trainer.data.images import ImageRules
from finetune.trainer.errors import JobInputError, NonFiniteLoss
from finetune.trainer.methods import TrainedModules, TrainingMethod, method_for
from finetune.trainer.models.components import Components, load_components
from finetune.trainer.outputs import artifacts, result, samples
from finetune.trainer.process import distributed
from finetune.trainer.process.stopping import Stopped, StopRequest
from finetune.trainer.storage.s3 import S3Settings
from finetune.trainer.storage.store import open_store
from finetune.trainer.telemetry import prometheus
from finetune.trainer.telemetry.pace import Pace
from finetune.trainer.telemetry.status import StatusReporter

log = logging.getLogger(__name__)

# The method's own state in a checkpoint (the LCM target network).
METHOD_STATE = "method.pt"
# Test hook: the last rank dies (as if SIGKILLed) right after this step completes.
CRASH_AFTER_STEP_ENV = "FINETUNE_TEST_CRASH_AFTER_STEP"


@dataclass(frozen=True)
class RunPlan:
    """What the launcher resolved before starting the workers: local paths only."""

    name: str
    spec: TrainingSpec
    work_dir: Path
    model_folder: Path
    concept_folders: list[Path]
    class_folders: list[Path]
    output_uri: str
    teacher_folder: Path | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "spec": self.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
                "workDir": str(self.work_dir),
                "modelFolder": str(self.model_folder),
                "conceptFolders": [str(p) for p in self.concept_folders],
                "classFolders": [str(p) for p in self.class_folders],
                "outputUri": self.output_uri,
                "teacherFolder": str(self.teacher_folder) if self.teacher_folder else None,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        raw = json.loads(text)
        return cls(
            name=raw["name"],
            spec=TrainingSpec.model_validate(raw["spec"]),
            work_dir=Path(raw["workDir"]),
            model_folder=Path(raw["modelFolder"]),
            concept_folders=[Path(p) for p in raw["conceptFolders"]],
            class_folders=[Path(p) for p in raw["classFolders"]],
            output_uri=raw["outputUri"],
            teacher_folder=Path(raw["teacherFolder"]) if raw.get("teacherFolder") else None,
        )


def data_file(rank: int) -> str:
    """Each rank's data-stream state in a checkpoint."""
    return f"data-rank{rank:04d}.json"


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: value}


def _dtype(precision: str) -> torch.dtype:
    return {MixedPrecision.BF16: torch.bfloat16, MixedPrecision.FP16: torch.float16}.get(
        MixedPrecision(precision), torch.float32
    )


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def deepspeed_config(spec: TrainingSpec, world: int) -> dict[str, Any]:
    hp, ds = spec.training, spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "train_batch_size": hp.batch_size * hp.gradient_accumulation_steps * world,
        "gradient_clipping": hp.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": hp.mixed_precision == MixedPrecision.BF16},
        "fp16": {"enabled": hp.mixed_precision == MixedPrecision.FP16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.config or {})


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise JobInputError(
            "spec.training.optimizer: adamw8bit needs bitsandbytes, which is not installed; use adamw"
        ) from None
    return bitsandbytes


def check_optimizer(spec: TrainingSpec) -> None:
    """Fail before any worker starts when the optimizer's library is missing."""
    if spec.training.optimizer == Optimizer.ADAMW_8BIT:
        _bitsandbytes()


def check_loss(loss: float, step: int) -> float:
    """`loss` when finite; otherwise the run has diverged and no later step can mend it."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"step {step}: the training loss is {loss}; the run diverged. Lower "
            "spec.training.learningRate (or use bf16 rather than fp16) and run again"
        )
    return loss


def make_optimizer(spec: TrainingSpec, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    hp = spec.training
    betas = (hp.adam_beta1, hp.adam_beta2)
    if hp.optimizer == Optimizer.ADAMW_8BIT:
        bitsandbytes = _bitsandbytes()
        optimizer: torch.optim.Optimizer = bitsandbytes.optim.AdamW8bit(
            groups,
            lr=hp.learning_rate,
            betas=betas,
            weight_decay=hp.adam_weight_decay,
            eps=hp.adam_epsilon,
        )
        return optimizer
    return torch.optim.AdamW(
        groups,
        lr=hp.learning_rate or 1e-4,
        betas=betas,
        weight_decay=hp.adam_weight_decay,
        eps=hp.adam_epsilon,
    )


class Trainer:
    def __init__(
        self, plan: RunPlan, rank: distributed.Rank, stop: StopRequest | None = None
    ) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.rank = rank
        self.stop = stop or StopRequest()
        self.checkpoint_root = plan.work_dir / "checkpoints"
        self.log_path = plan.work_dir / "train_log.jsonl"
        self.reporter: StatusReporter | None = None
        # With an s3:// output: checkpoints uploaded in the background, resumed from S3.
        self.durable: DurableCheckpoints | None = None

    # --- setup ---------------------------------------------------------------

    def _setup(self) -> None:
        spec, hp = self.spec, self.spec.training
        if spec.deepspeed.zero_stage == 3:
            raise JobInputError(
                "spec.deepspeed.zeroStage: 3 is not supported by the trainer yet; use 2"
            )
        self.device = distributed.init(self.rank)
        self.dtype = _dtype(hp.mixed_precision)
        # Same seed on every rank while models are built, so adapters start equal.
        torch.manual_seed(hp.seed)
        self.components: Components = load_components(self.plan.model_folder)
        self.method: TrainingMethod = method_for(spec, self.components, self.plan.teacher_folder)
        self.module: TrainedModules = self.method.build()
        c = self.components
        frozen = [c.vae] + ([c.text_encoder] if self.module.text_encoder is None else [])
        for part in frozen:
            part.to(self.device).eval()
            if self.dtype != torch.float32:
                part.to(dtype=self.dtype)
        self.encoder = Encoder(
            c,
            self.device,
            self.dtype,
            text_encoder_trains=self.module.text_encoder is not None,
            cache=spec.data.dataset is None,
            # Concept prompts are the same on every rank; dataset captions are not.
            announce=self.rank.main or spec.data.dataset is not None,
        )
        self.batches = self._batches()
        self.method.attach(self.encoder)
        self._init_engine()
        if is_s3(self.plan.output_uri):
            self.durable = DurableCheckpoints(
                open_store(self.plan.output_uri, self._s3()),
                self.checkpoint_root,
                self.rank,
                self.device,
                spec.checkpointing.keep_last,
                self.reporter.checkpoint if self.reporter is not None else None,
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

    def _s3(self) -> S3Settings:
        return S3Settings.of(self.spec.output)

    def _batches(self) -> Batches:
        spec, hp = self.spec, self.spec.training
        if spec.data.dataset is not None:
            settings = self._s3()
            stream = open_stream(
                spec.data.dataset, settings, hp.seed, self.rank.rank, self.rank.world
            )
            return CaptionBatches(
                stream, self.method.preprocess, self.encoder, self.rank, hp.batch_size
            )
        instances = self._examples(self.plan.concept_folders, class_images=False)
        classes: list[Example] = []
        if hp.prior_preservation:
            self._ensure_class_images()
            classes = self._examples(self.plan.class_folders, class_images=True)
        return ConceptBatches(
            instances, classes, self.method, self.encoder, self.rank, hp.batch_size, hp.seed
        )

    def _examples(self, folders: list[Path], class_images: bool) -> list[Example]:
        found: list[Example] = []
        for index, (concept, folder) in enumerate(
            zip(self.spec.data.concepts, folders, strict=True)
        ):
            if class_images:
                assert concept.class_prompt is not None
                field = f"spec.data.concepts[{index}].classImages.uri"
                rules = ImageRules.of(self.spec.data)
                found += examples_from(folder, concept.class_prompt, False, field, rules=rules)[
                    : concept.class_images.count
                ]
            else:
                # The launcher decoded every instance image already; class
                # images may be new (generated by rank 0), so they are checked here.
                field = f"spec.data.concepts[{index}].instanceImages"
                found += examples_from(
                    folder, concept.instance_prompt, concept.caption_files, field, check=False
                )
        return found

    def _ensure_class_images(self) -> None:
        """Generate the class images a concept lacks with the base model (rank 0), once."""
        if self.rank.main:
            from finetune.trainer.data.class_images import generate_missing

            # DeepSpeed moves the trained modules later; generation needs them now.
            self.components.unet.to(self.device)
            self.components.text_encoder.to(self.device)
            generate_missing(
                self.spec, self.components, self.plan.class_folders, self.device, self.dtype
            )
        distributed.barrier()

    def _init_engine(self) -> None:
        import deepspeed
        from diffusers.optimization import get_scheduler

        hp = self.spec.training
        optimizer = make_optimizer(self.spec, self.method.parameter_groups(self.module))

        def scheduler(opt: torch.optim.Optimizer) -> Any:
            return get_scheduler(
                hp.lr_scheduler,
                optimizer=opt,
                num_warmup_steps=hp.lr_warmup_steps,
                num_training_steps=hp.max_steps,
                num_cycles=hp.lr_num_cycles,
                power=hp.lr_power,
            )

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(self.spec, self.rank.world),
        )

    # --- checkpoints ------------------------------------------------------------

    def _latest(self) -> manifest.Checkpoint | None:
        """The checkpoint to resume from: with an s3:// output, the newest durable one
        there (fetched into the local folder); else the newest local one that verifies."""
        found: manifest.Checkpoint | None
        if self.durable is None:
            found = distributed.broadcast(
                manifest.latest(self.checkpoint_root) if self.rank.main else None
            )
            return found
        found = distributed.broadcast(self.durable.restore() if self.rank.main else None)
        # Another node has a disk of its own (on a shared one nothing is fetched again).
        other_node = not self.rank.main and self.rank.local_rank == 0
        if found is not None and other_node and self.durable.fetch(found.tag) is None:
            raise JobInputError(f"{found.folder}: the checkpoint changed while resuming")
        distributed.barrier()
        return found

    def _resume(self) -> int:
        found = self._latest()
        if found is None:
            return 0
        saved = manifest.layout_of(found)
        if saved and saved != self._layout():
            differences = ", ".join(
                f"{k} {saved.get(k)} -> {v}" for k, v in self._layout().items() if saved.get(k) != v
            )
            raise JobInputError(
                f"{found.folder}: this checkpoint was written by a run laid out differently ({differences}); "
                "run with the same settings, or remove the checkpoints to start over"
            )
        self.engine.load_checkpoint(
            str(self.checkpoint_root), tag=found.tag, load_module_strict=False
        )
        manifest.restore_rng(
            torch.load(manifest.rng_file(found.folder, self.rank.rank), weights_only=False)
        )
        data_state = found.folder / data_file(self.rank.rank)
        if data_state.exists():
            self.batches.load_state(json.loads(data_state.read_text()))
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(found.folder / "ema.pt", weights_only=False))
        if (found.folder / METHOD_STATE).exists():
            self.method.load_checkpoint_state(
                torch.load(
                    found.folder / METHOD_STATE, map_location=self.device, weights_only=False
                )
            )
        if self.rank.main:
            log.info("resumed from %s (step %d)", found.folder, found.step)
        return int(found.step)

    def _layout(self) -> dict[str, Any]:
        """What must be the same for a checkpoint to continue this run: the ranks and the
        spec, except what may change between runs (more steps, checkpoints, samples)."""
        spec = self.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        spec["training"].pop("maxSteps", None)
        for changeable in ("checkpointing", "validation", "output"):
            spec.pop(changeable, None)
        return {"ranks": self.rank.world, **_flatten(spec, "spec")}

    def _save_checkpoint(self, step: int) -> None:
        tag = manifest.tag_for(step)
        folder = self.checkpoint_root / tag
        if self.rank.main:  # a manifest left by an earlier run must not vouch for new files
            (folder / manifest.MANIFEST).unlink(missing_ok=True)
        distributed.barrier()
        with manifest.space_checked(folder, step):
            # DeepSpeed collects from every rank: all of them must call it.
            self.engine.save_checkpoint(
                str(self.checkpoint_root),
                tag=tag,
                client_state={"step": step},
                save_latest=False,
                exclude_frozen_parameters=True,
            )
            torch.save(manifest.rng_state(), manifest.rng_file(folder, self.rank.rank))
            data_state = self.batches.state()
            if data_state:
                (folder / data_file(self.rank.rank)).write_text(json.dumps(data_state))
            if self.ema is not None and self.rank.main:
                torch.save(self.ema.state_dict(), folder / "ema.pt")
            method_state = self.method.checkpoint_state()
            if method_state is not None and self.rank.main:
                torch.save(method_state, folder / METHOD_STATE)
        distributed.barrier()
        if self.durable is not None:
            with manifest.space_checked(folder, step):
                self.durable.saved(step, self._layout())
        elif self.rank.main:
            with manifest.space_checked(folder, step):
                manifest.write_manifest(folder, step, self._layout())
            manifest.prune(self.checkpoint_root, self.spec.checkpointing.keep_last)
            if self.reporter is not None:
                self.reporter.checkpoint(str(folder), step)
        distributed.barrier()

    # --- the loop -------------------------------------------------------------

    def run(self) -> int:
        # Rank 0 alone reports (in a pod); whatever way the run ends, what is
        # pending still goes out.
        self.reporter = StatusReporter.from_env() if self.rank.main else None
        self.pace = Pace()
        self.metrics = prometheus.start(
            self.plan.name, str(self.spec.method), self.rank.rank, self.rank.local_rank
        )
        self._uploads_recorded = (0, 0.0)  # bytes and seconds of checkpoint uploads so far
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
        interval = self.spec.checkpointing.every_n_steps or hp.max_steps
        crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "0"))
        images_per_step = hp.batch_size * hp.gradient_accumulation_steps * self.rank.world
        progress = self._progress_bar(step)
        last_loss: float | None = None
        self.engine.train()
        while step < hp.max_steps:
            started = time.perf_counter()
            losses = []
            for micro in range(hp.gradient_accumulation_steps):
                batch = self.batches.batch(step * hp.gradient_accumulation_steps + micro)
                loss = self.method.loss(self.engine, batch, self.dtype)
                self.engine.backward(loss)
                self.engine.step()
                losses.append(float(loss.detach()))
            step += 1
            self.method.after_step(self.module)
            if self.ema is not None:
                self.ema.step(self.module.unet.parameters())
            last_loss = check_loss(distributed.mean(sum(losses) / len(losses), self.device), step)
            speed = images_per_step / (time.perf_counter() - started)
            self._record(step, last_loss, speed, progress)
            # A stop asked for on the last step lets the job finish instead.
            stopping = (
                distributed.any_rank(self.stop.requested, self.device) and step < hp.max_steps
            )
            if step % interval == 0 or stopping:
                saving = time.perf_counter()
                self._save_checkpoint(step)
                folder = self.checkpoint_root / manifest.tag_for(step)
                self.metrics.record_checkpoint_saved(
                    time.perf_counter() - saving, prometheus.folder_bytes(folder)
                )
            if self.durable is not None:
                self.durable.poll()
                self._record_uploads()
            if crash_after and step == crash_after and self.rank.rank == self.rank.world - 1:
                os._exit(1)
            if stopping:
                if self.durable is not None:
                    self.durable.finish()
                if progress is not None:
                    progress.close()
                if self.rank.main:
                    print(
                        f"Stopped at step {step}; checkpoint saved. Run the same command to resume.",
                        flush=True,
                    )
                return EXIT_INTERRUPTED
            validation = self.spec.validation
            if validation.prompts and step % validation.every_n_steps == 0 and step < hp.max_steps:
                self._samples(step)
        if progress is not None:
            progress.close()
        self._finish(step, last_loss)
        return EXIT_OK

    def _progress_bar(self, step: int) -> Any:
        if not self.rank.main:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.spec.training.max_steps,
            initial=step,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def _record(self, step: int, loss: float, speed: float, progress: Any) -> None:
        hp = self.spec.training
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else None
        seconds = hp.batch_size * hp.gradient_accumulation_steps * self.rank.world / speed
        eta = self.pace.step_done(step, hp.max_steps)  # one ETA for both
        self.metrics.record_step(
            step, hp.max_steps, loss, lr, speed, seconds, eta, self._gpu_memory()
        )
        if not self.rank.main:
            return
        entry: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "imagesPerSecond": speed,
            "time": time.time(),
        }
        entry["rssPeakBytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.device.type == "cuda":
            entry["gpuMemoryPeakBytes"] = torch.cuda.max_memory_allocated(self.device)
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
            progress.update(1)
        if self.reporter is not None:
            self.reporter.progress(step, hp.max_steps, loss, speed, eta)

    def _gpu_memory(self) -> tuple[int, int]:
        """(allocated, peak) bytes of this rank's GPU; none on a CPU."""
        if self.device.type != "cuda":
            return (0, 0)
        return (
            torch.cuda.memory_allocated(self.device),
            torch.cuda.max_memory_allocated(self.device),
        )

    def _record_uploads(self) -> None:
        """Once another checkpoint's files are all uploaded, its time and bytes."""
        assert self.durable is not None
        uploader = self.durable.uploader
        sent, seconds = uploader.bytes_sent, uploader.seconds
        if sent > self._uploads_recorded[0]:
            done_bytes, done_seconds = self._uploads_recorded
            self.metrics.record_checkpoint_uploaded(seconds - done_seconds, sent - done_bytes)
            self._uploads_recorded = (sent, seconds)

    def _samples(self, step: int) -> Path | None:
        grid = None
        if self.rank.main:
            folder = samples.sample_folder(self.plan.work_dir, step)
            try:
                grid = samples.generate(
                    self.spec,
                    self.components,
                    self.method.sampling_modules(self.module),
                    self.method.sampling_scheduler(),
                    folder,
                    self.device,
                    self.dtype,
                    self.stop,
                )
            except Stopped:  # the loop's next step stops every rank, with a checkpoint
                log.warning("step %d: samples left out, a stop was requested", step)
            else:
                validation = self.spec.validation
                self.metrics.record_samples(len(validation.prompts) * validation.images_per_prompt)
        distributed.barrier()
        return grid

    def _finish(self, step: int, last_loss: float | None) -> None:
        if self.durable is not None:  # every checkpoint durable before the results
            self.durable.finish()
        if self.ema is not None:
            self.ema.copy_to(self.module.unet.parameters())
        grid = self._samples(step) if self.spec.validation.prompts else None
        if self.rank.main:
            work_dir = self.plan.work_dir
            staging = result.staging_folder(work_dir)
            with manifest.space_checked(staging, step):
                self.method.save(self.module, staging)
                # The card lists the weights and the samples with their SHA-256 and size.
                listed = artifacts.list_artifacts(staging, "") + [
                    a for a in artifacts.list_artifacts(work_dir, "") if a["kind"] == "samples"
                ]
                files = [(a["uri"].lstrip("/"), a["bytes"], a["sha256"]) for a in listed]
                card = result.model_card(
                    self.spec, self.plan.name, step, last_loss, grid, work_dir, files
                )
                (staging / result.MODEL_CARD).write_text(card)
            result.promote(staging, work_dir)
            if is_s3(self.plan.output_uri):
                result.upload_results(work_dir, open_store(self.plan.output_uri, self._s3()))
            if self.reporter is not None:
                self.reporter.artifacts(artifacts.list_artifacts(work_dir, self.plan.output_uri))
                self.reporter.close()
            if self.durable is not None:
                self._record_uploads()
            self.metrics.push()  # a job shorter than a scrape interval is still seen
            print(f"Done: {step} steps; results in {self.plan.output_uri}", flush=True)
        distributed.barrier()
