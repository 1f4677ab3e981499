"""The training loop every method shares, driven through DeepSpeed on every rank.

The Trainer sets a run up (`engine.setup`: models, data, engine), resumes it, and steps
it to the end; what each step reports lives in `telemetry.steps`, the end of a run in
`outputs.finish`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from finetune.api.pod import EXIT_INTERRUPTED, EXIT_OK
from finetune.api.selection import OutputFrom
from finetune.trainer.checkpoints.manifest import loss_of, tag_for
from finetune.trainer.engine.setup import RunSetup
from finetune.trainer.engine.speed import CompileReport
from finetune.trainer.engine.upload_waits import (
    checkpoints_sent,
    left_message,
    results_patience,
)
from finetune.trainer.errors import NonFiniteLoss
from finetune.trainer.evaluation.scores import Scores, history
from finetune.trainer.evaluation.selection import Chosen, Stall, ranked
from finetune.trainer.outputs.finish import finish_run
from finetune.trainer.outputs.samples import Validation
from finetune.trainer.process import distributed
from finetune.trainer.process.stopping import Stopped
from finetune.trainer.process.tether import SENDING_MARKER_ENV
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


class Trainer(RunSetup):
    """Steps a run `RunSetup` made to its end: a stop, an early stop or `maxSteps`."""

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
        self.checkpoints.carry_board(telemetry.board)  # its event files go with checkpoints
        compiling = CompileReport(hp.compile, self.rank.main)
        self.resumed_step = step
        # The checkpoint's: a run that trains no step (run again after it finished) reports it.
        last_loss = self._checkpoint_loss(step)
        if step > 0:
            telemetry.resumed(step, last_loss, self._latest_scores(step))
        # keepBest: every validation's weights are in a checkpoint, to be kept if best.
        checkpoint_validations = self.spec.checkpointing.keep_best is not None
        stall = self._stops_early(step) if step < hp.max_steps else None
        if stall is not None:  # it had stopped before a resume
            telemetry.close_progress()
            return self._finish(step, last_loss, stall=stall)
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
            stall = self._stops_early(step) if validation is not None else None
            # The run's last step has one too (its end, or an early stop's): run again (a
            # results upload cut short, say), it trains no step, and a larger maxSteps
            # continues from it.
            ends = step == hp.max_steps or stall is not None
            if step % interval == 0 or stopping or ends or (validation and checkpoint_validations):
                saving = time.perf_counter()
                folder = self.checkpoints.save(step, self.selection.manifest_entries(), last_loss)
                telemetry.checkpoint_saved(time.perf_counter() - saving, folder)
            self.checkpoints.poll()
            telemetry.uploads(self.checkpoints.uploads)
            if crash_after and step == crash_after and self.rank.rank == self.rank.world - 1:
                os._exit(1)
            if stopping:
                return self._stopped(step)
            if stall is not None:
                telemetry.close_progress()
                return self._finish(step, last_loss, validation, stall)
        telemetry.close_progress()
        return self._finish(step, last_loss)

    def _validation_made(self, step: int) -> Validation | None:
        """On every rank, in a run that trains no step (the same command run again after
        the run finished or stopped early): the validation of `step` the earlier run made
        and logged, reused as it is, not made and logged again; None where that run ended
        before it (it is then made as usual)."""
        made = None
        if self.rank.main:
            basis = self.selection.basis  # made with other settings: made again
            logged = [s for s in history(self.log_path) if s.step == step and s.comparable(basis)]
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
        with self._delivered_weights():
            validation = self.sampler.at(step)
        self.telemetry.validation(
            step, validation.scores, validation.grid, validation.distillation_grid
        )
        if validation.scores is not None:
            self.selection.add(validation.scores)
        return validation

    @contextmanager
    def _delivered_weights(self) -> Iterator[None]:
        """The weights the job would deliver, in the model for a validation: with
        `training.ema` their EMA (as diffusers' scripts validate), so that the samples,
        their scores and what keepBest, earlyStopping and `output.from: best` choose by are
        of the weights a user gets. The trained weights are put back after, bit for bit.
        Rank 0 alone samples (the others wait), so it alone swaps."""
        if self.ema is None or not self.rank.main:
            yield
            return
        trained = list(self.module.unet.parameters())
        self.ema.store(trained)  # a copy in host memory, not on the device
        self.ema.copy_to(trained)
        try:
            yield
        finally:
            self.ema.restore(trained)

    def _stops_early(self, step: int) -> Stall | None:
        """On every rank, after a validation: where the run stands when
        `training.earlyStopping` ends it (rank 0's scores decide), else None; rank 0 says
        so everywhere it reports."""
        if self.spec.training.early_stopping is None:
            return None
        stall: Stall | None = distributed.broadcast(
            self.selection.stall() if self.rank.main else None
        )
        if stall is not None:
            self.telemetry.early_stop(step, stall, self.spec.training.early_stopping)
        return stall

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
        marker = os.environ.get(SENDING_MARKER_ENV) if self.rank.main else None
        if marker:
            Path(marker).touch()
        try:
            sent = self._checkpoints_sent()
        finally:
            if marker:
                Path(marker).unlink(missing_ok=True)
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
        self,
        step: int,
        last_loss: float | None,
        validation: Validation | None = None,
        stall: Stall | None = None,
    ) -> int:
        """The results of `step` (the last, or an early stop's: `stall`); `validation`: its
        own, when the loop made it. Exit 0, or 130 where a second stop left an upload."""
        if not self._checkpoints_sent():  # every checkpoint counts before the results
            if self.rank.main:
                print(left_message(step, self.checkpoints), flush=True)
            return EXIT_INTERRUPTED
        self.telemetry.uploads(self.checkpoints.uploads)
        if validation is None and self.spec.validation.prompts:
            if step == self.resumed_step:
                validation = self._validation_made(step)
            if validation is None:
                validation = self._validate(step)
        best = self._best_weights(step, last_loss)  # loads the chosen step's EMA too
        if self.ema is not None:  # the result is the EMA, as every validation judged it
            self.ema.copy_to(self.module.unet.parameters())
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
                self.checkpoints.record,
                stall,
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

    def _best_weights(self, step: int, last_loss: float | None) -> Chosen | None:
        """`output.from: best`, on every rank: the best validation whose weights are left
        (its checkpoint's loaded, unless they are the last step's), with the best's when
        its checkpoint is gone; None for the last step's weights."""
        keep = self.spec.checkpointing.keep_best
        if self.spec.output.from_ != OutputFrom.BEST or keep is None:
            return None
        best: Scores | None = None
        left: list[Scores] = []  # those whose weights are here or kept, best first
        if self.rank.main:
            best = self.selection.best()
            kept = self.checkpoints.kept() | {step}
            left = [
                s
                for s in ranked(self.selection.comparable(), keep.metric, keep.mode)
                if s.step in kept
            ]
        best, left = distributed.broadcast((best, left))
        if best is None:
            return None
        for scores in left:
            if scores.step == step:
                loss = last_loss
            elif self.checkpoints.load(scores.step):
                loss = self._weights_loss(scores.step)
            else:
                continue
            gone = best if scores.step != best.step else None
            if gone is not None and self.rank.main:
                log.warning(
                    "the checkpoint of step %d, the best validation by %s, is gone; the "
                    "result is the weights of step %d, the best validation whose weights "
                    "are left",
                    best.step,
                    keep.metric,
                    scores.step,
                )
            return Chosen(scores, loss, gone)
        if self.rank.main:
            log.warning(
                "the checkpoint of step %d, the best validation, is gone; the result is "
                "the weights of step %d",
                best.step,
                step,
            )
        return None

    def _weights_loss(self, step: int) -> float | None:
        """Rank 0: the training loss of `step`, as its (loaded) checkpoint's manifest says."""
        if not self.rank.main:
            return None
        return loss_of(self.checkpoints.root / tag_for(step))
