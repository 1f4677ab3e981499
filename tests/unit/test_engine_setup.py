"""The engine's set-up (DeepSpeed config, optimizer) and the step record it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.api import FineTuneJob
from finetune.trainer.engine.deepspeed_setup import deepspeed_config, make_optimizer, trainer_clips
from finetune.trainer.evaluation.scores import history
from finetune.trainer.telemetry.prometheus import Identity, TrainerMetrics
from finetune.trainer.telemetry.steps import StepRecord, StepTelemetry
from finetune.trainer.telemetry.tensorboard import Board
from tests.support import lora_job
from tests.trainer.jobs import tensorboard_scalars


def test_deepspeed_config_follows_the_job() -> None:
    spec = FineTuneJob.model_validate(
        lora_job(
            training={
                "batchSize": 3,
                "gradientAccumulationSteps": 2,
                "maxGradNorm": 0.5,
            },
            deepspeed={
                "zeroStage": 1,
                "offloadOptimizer": True,
                "config": {"zero_optimization": {"overlap_comm": True}},
            },
        )
    ).spec.training_spec()
    config = deepspeed_config(spec, world=4, stage=1, device=torch.device("cpu"))
    assert config["train_batch_size"] == 3 * 2 * 4
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage"] == 1
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["overlap_comm"] is True  # the raw override is merged, not replacing


@pytest.mark.parametrize(
    ("stage", "precision", "trainer"),
    [(0, "bf16", True), (0, "no", True), (0, "fp16", False), (2, "bf16", False)],
)
def test_the_trainer_clips_gradients_where_deepspeed_would_walk_every_parameter(
    stage: int, precision: str, trainer: bool
) -> None:
    """ZeRO-0 without loss scaling: the trainer clips the trained parameters itself and
    DeepSpeed does not clip again; ZeRO-1/2 (partitioned gradients) and fp16 (scaled
    ones) leave clipping to DeepSpeed."""
    spec = FineTuneJob.model_validate(
        lora_job(training={"maxGradNorm": 0.5, "mixedPrecision": precision})
    ).spec.training_spec()
    config = deepspeed_config(spec, world=2, stage=stage, device=torch.device("cpu"))
    assert trainer_clips(spec, stage) is trainer
    assert config["gradient_clipping"] == (0.0 if trainer else 0.5)


@pytest.mark.parametrize(("method", "learning_rate"), [("dreambooth", 5e-6), ("lora", 1e-4)])
def test_the_optimizer_starts_at_the_methods_default_learning_rate(
    method: str, learning_rate: float
) -> None:
    spec = FineTuneJob.model_validate(lora_job(method=method)).spec.training_spec()
    weights = torch.nn.Parameter(torch.zeros(2))
    optimizer = make_optimizer(spec, [{"params": [weights]}], torch.device("cpu"))
    assert optimizer.param_groups[0]["lr"] == learning_rate


def test_a_step_record_reports_the_measured_seconds_and_the_speed_from_them(
    tmp_path: Path,
) -> None:
    metrics = TrainerMetrics(Identity("job", "default", "lora", 0))
    log_path = tmp_path / "train_log.jsonl"
    telemetry = StepTelemetry(metrics, None, log_path, torch.device("cpu"), True, 10, 0)
    telemetry.step(StepRecord(1, 10, 0.5, 1e-4, seconds=0.3, images=6))
    telemetry.close_progress()
    entry = json.loads(log_path.read_text())
    assert entry["imagesPerSecond"] == pytest.approx(20.0)
    assert entry["stepSeconds"] == 0.3
    labels = {"job": "job", "namespace": "default", "method": "lora", "rank": "0"}
    seconds = metrics.registry.get_sample_value("finetune_step_duration_seconds_sum", labels)
    assert seconds == 0.3  # the very seconds measured, not turned into speed and back


def test_a_run_starting_at_a_step_drops_what_the_train_log_holds_after_it(
    tmp_path: Path,
) -> None:
    """What an interrupted run logged after the checkpoint resumed from is trained (and
    logged) again: each step, and each validation, is in the log once."""
    log_path = tmp_path / "train_log.jsonl"
    logged = [
        {"step": 1, "loss": 0.1},
        {"step": 2, "loss": 0.2},
        {"step": 2, "validation": {"dino": 0.5}},
        {"step": 3, "loss": 0.3},
        {"step": 4, "loss": 0.4},
        {"step": 4, "validation": {"dino": 0.6}},
    ]
    log_path.write_text("".join(json.dumps(e) + "\n" for e in logged) + '{"step": 5, "lo')
    metrics = TrainerMetrics(Identity("job", "default", "lora", 0))
    telemetry = StepTelemetry(metrics, None, log_path, torch.device("cpu"), True, 10, 2)
    telemetry.step(StepRecord(3, 10, 0.35, 1e-4, seconds=0.3, images=6))
    telemetry.close_progress()
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(e["step"], e.get("loss")) for e in entries] == [
        (1, 0.1),
        (2, 0.2),
        (2, None),
        (3, 0.35),
    ]
    assert [scores.step for scores in history(log_path)] == [2]

    StepTelemetry(metrics, None, log_path, torch.device("cpu"), True, 10, 0).close_progress()
    assert log_path.read_text() == "", "a run that starts over logs its own steps only"


def test_a_run_that_starts_over_hides_the_earlier_runs_events(tmp_path: Path) -> None:
    for losses in ([0.9, 0.8, 0.7], [0.5]):
        board = Board(tmp_path, 0)
        for step, loss in enumerate(losses, start=1):
            board.step(step, loss, None, 1.0)
        board.close()
    assert tensorboard_scalars(tmp_path)["train/loss"] == [(1, 0.5)]


def test_event_files_are_ended_at_each_checkpoint_and_continue_one_another(
    tmp_path: Path,
) -> None:
    earlier = Board(tmp_path, 0)  # an interrupted run, resumed from step 2
    for step in (1, 2, 3, 4):
        earlier.step(step, 0.9, None, 1.0)
    earlier.close()
    board = Board(tmp_path, 2)
    board.step(3, 0.5, None, 1.0)
    board.roll()  # a checkpoint
    board.step(4, 0.4, None, 1.0)
    board.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 3
    # The earlier run's steps after 2 purged by the first file; the second purges nothing.
    shown = tensorboard_scalars(tmp_path)["train/loss"]
    assert [step for step, _ in shown] == [1, 2, 3, 4]
    assert [value for _, value in shown] == pytest.approx([0.9, 0.9, 0.5, 0.4])


@pytest.mark.parametrize(
    ("device", "offload", "fused"),
    [("cuda", False, True), ("cuda", True, None), ("cpu", False, None)],
)
def test_adamw_is_fused_where_the_weights_and_its_state_are_on_a_gpu(
    device: str, offload: bool, fused: bool | None
) -> None:
    """Unfused, `fused` stays unset (None): torch then takes its multi-tensor step,
    where False would force the slow per-tensor one."""
    spec = FineTuneJob.model_validate(
        lora_job(deepspeed={"offloadOptimizer": offload})
    ).spec.training_spec()
    weights = torch.nn.Parameter(torch.zeros(2))  # moved by DeepSpeed after this, in place
    optimizer = make_optimizer(spec, [{"params": [weights]}], torch.device(device))
    assert optimizer.defaults["fused"] is fused
