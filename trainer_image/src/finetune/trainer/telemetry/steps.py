"""One record per optimizer step, and where it goes: Prometheus on every rank; on rank 0
also the train log (`train_log.jsonl`), TensorBoard (`logs/`), the progress bar and the
status reporter. The scores of each validation (`validation.metrics`) go the same ways,
from rank 0, and its sample grid to TensorBoard.

The step's time is measured once, in seconds; the speed is derived from it here.
A run that starts at step N first drops the train log's lines of later steps (those an
interrupted run logged after its checkpoint), as TensorBoard's purge does: each step
is logged once. It then reports where it stands (`resumed`); a finished run run again
(it trains nothing) adds no line for what the log already has.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from finetune.api.selection import EarlyStopping
from finetune.api.status import EarlyStop
from finetune.trainer.evaluation.scores import Scores
from finetune.trainer.evaluation.selection import Stall
from finetune.trainer.storage.files import write_text_whole
from finetune.trainer.telemetry.pace import Pace
from finetune.trainer.telemetry.prometheus import TrainerMetrics, folder_bytes
from finetune.trainer.telemetry.status import StatusReporter
from finetune.trainer.telemetry.tensorboard import Board
from finetune.trainer.telemetry.train_log import entries


class UploadTotals(Protocol):
    """What a checkpoint uploader has sent so far (`storage.uploader.Uploader`)."""

    bytes_sent: int
    seconds: float


@dataclass(frozen=True)
class StepRecord:
    step: int
    total_steps: int
    loss: float  # the mean over ranks
    learning_rate: float | None
    seconds: float  # the optimizer step's wall time, gradient accumulation included
    images: int  # what the whole gang trained on in it

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


class StepTelemetry:
    """Records a run's steps, checkpoint saves and uploads; opens the progress bar (rank 0)."""

    def __init__(
        self,
        metrics: TrainerMetrics,
        reporter: StatusReporter | None,
        log_path: Path,
        device: torch.device,
        main: bool,
        total_steps: int,
        initial_step: int,
        board: Board | None = None,
    ) -> None:
        self.metrics = metrics
        self.board = board
        self.reporter = reporter
        self.log_path = log_path
        self.device = device
        self.main = main
        self.total_steps = total_steps
        self.progress = _progress_bar(total_steps, initial_step) if main else None
        if main:
            trim_train_log(log_path, initial_step)
        self.pace = Pace()
        self._uploads_recorded = (0, 0.0)  # bytes and seconds of checkpoint uploads so far

    def step(self, record: StepRecord) -> None:
        speed = record.images_per_second
        eta = self.pace.step_done(record.step, record.total_steps)  # one ETA for both
        self.metrics.record_step(
            record.step,
            record.total_steps,
            record.loss,
            record.learning_rate,
            speed,
            record.seconds,
            eta,
            self._gpu_memory(),
        )
        if not self.main:
            return
        self._log(record, speed)
        if self.board is not None:
            self.board.step(record.step, record.loss, record.learning_rate, speed)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{record.loss:.4f}", refresh=False)
            self.progress.update(1)
        if self.reporter is not None:
            self.reporter.progress(record.step, record.total_steps, record.loss, speed, eta)

    def resumed(self, step: int, loss: float | None, latest: Scores | None) -> None:
        """Where a resumed run stands before its next step: `step` done with `loss` (its
        checkpoint's), `latest` the last validation's scores (rank 0). To Prometheus (every
        rank) and the job's status, whose progress, loss and scores a finished run run
        again (which trains no step) would otherwise never report."""
        self.metrics.record_position(step, self.total_steps, loss)
        if not self.main:
            return
        if latest is not None:
            self.metrics.record_validation(
                latest.step, latest.labelled(), latest.seconds, latest.by_steps()
            )
        if self.reporter is not None:
            if latest is not None:  # before the progress, which carries them
                self.reporter.metrics(latest.status())
            done = step >= self.total_steps
            self.reporter.progress(step, self.total_steps, loss, None, 0 if done else None)

    def validation(
        self,
        step: int,
        scores: Scores | None,
        grid: Path | None = None,
        distillation_grid: Path | None = None,
    ) -> None:
        """A validation (rank 0): its grids and scores to TensorBoard; the scores (with
        `validation.metrics`) also as a train-log line, Prometheus gauges and
        `status.progress.metrics`."""
        if not self.main:
            return
        if self.board is not None:
            self.board.validation(step, scores, grid, distillation_grid)
        if scores is None:
            return
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(scores.log_entry()) + "\n")
        self.metrics.record_validation(
            scores.step, scores.labelled(), scores.seconds, scores.by_steps()
        )
        if self.reporter is not None:
            self.reporter.metrics(scores.status())

    def early_stop(self, step: int, stall: Stall, rule: EarlyStopping) -> None:
        """Rank 0: `training.earlyStopping` ends the run after `step`: said in the log, the
        train log (unless it says so already: the run had stopped before it was run
        again) and the job's status (`status.earlyStop`, the operator's reason)."""
        if not self.main:
            return
        best = stall.best.overall[rule.metric]
        message = (
            f"stopped early after step {step}: {rule.metric} has not improved by more than "
            f"{rule.min_delta:g} for {stall.since} validations (best {best:.4f} at step "
            f"{stall.best.step})"
        )
        self.close_progress()
        print(message[0].upper() + message[1:], flush=True)
        entry = {
            "step": step,
            "earlyStopped": {
                "metric": rule.metric,
                "best": best,
                "bestStep": stall.best.step,
                "validationsWithout": stall.since,
            },
            "time": time.time(),
        }
        if not logged(self.log_path, "earlyStopped", step):
            with self.log_path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
        if self.reporter is not None:
            self.reporter.early_stop(
                EarlyStop(
                    step=step,
                    metric=rule.metric,
                    best=best,
                    best_step=stall.best.step,
                    message=message,
                )
            )

    def checkpoint_saved(self, seconds: float, folder: Path) -> None:
        self.metrics.record_checkpoint_saved(seconds, folder_bytes(folder))

    def uploads(self, uploader: UploadTotals) -> None:
        """Once another checkpoint's files are all uploaded, its time and bytes."""
        sent, seconds = uploader.bytes_sent, uploader.seconds
        if sent > self._uploads_recorded[0]:
            done_bytes, done_seconds = self._uploads_recorded
            self.metrics.record_checkpoint_uploaded(seconds - done_seconds, sent - done_bytes)
            self._uploads_recorded = (sent, seconds)

    def finished(self) -> None:
        """Every rank, once the run is over (its last step, or an early stop): an ETA of 0
        and no throughput in Prometheus, on /metrics and in the final push."""
        self.metrics.record_finished()

    def results(self, artifacts: list[dict[str, Any]]) -> None:
        """Rank 0, at the end: the results into the status, and the final metrics pushed
        (a job shorter than a scrape interval is still seen)."""
        if self.reporter is not None:
            self.reporter.artifacts(artifacts)
            self.reporter.close()
        self.metrics.push()

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def close_board(self) -> None:
        """Everything TensorBoard was given, in its event file (before results upload)."""
        if self.board is not None:
            self.board.close()
            self.board = None

    def _log(self, record: StepRecord, speed: float) -> None:
        entry: dict[str, Any] = {
            "step": record.step,
            "loss": record.loss,
            "lr": record.learning_rate,
            "imagesPerSecond": speed,
            "stepSeconds": record.seconds,
            "time": time.time(),
            "rssPeakBytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if self.device.type == "cuda":
            entry["gpuMemoryPeakBytes"] = torch.cuda.max_memory_allocated(self.device)
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def _gpu_memory(self) -> tuple[int, int]:
        """(allocated, peak) bytes of this rank's GPU; none on a CPU."""
        if self.device.type != "cuda":
            return (0, 0)
        return (
            torch.cuda.memory_allocated(self.device),
            torch.cuda.max_memory_allocated(self.device),
        )


def trim_train_log(log_path: Path, step: int) -> None:
    """The train log without lines of steps after `step` (where a run starts; 0 when
    fresh), nor lines a crash cut short (the next line would be glued to them)."""
    if not log_path.is_file():
        return
    text = log_path.read_text()
    kept = "".join(f"{line}\n" for line in text.splitlines() if _logged_by(line, step))
    if kept != text:
        write_text_whole(log_path, kept, durable=True)


def logged(log_path: Path, kind: str, step: int) -> bool:
    """Whether the train log has a line of `kind` (`earlyStopped`) at `step`."""
    if not log_path.is_file():
        return False
    return any(e.get("step") == step and kind in e for e in entries(log_path.read_text()))


def _logged_by(line: str, step: int) -> bool:
    """Whether a train-log line is a complete entry of `step` or an earlier one."""
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    logged = entry.get("step") if isinstance(entry, dict) else None
    return isinstance(logged, int) and logged <= step


def _progress_bar(total_steps: int, initial_step: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, mininterval=0.5
    )
