"""Work between two training steps that takes long (a validation's samples, class images)
moves the job's `lastHeartbeat`: the operator restarts a gang whose heartbeat stops for
`heartbeatTimeoutSeconds`, and a big validation must not look like a hang."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.api.training import TrainingSpec
from finetune.trainer.data import class_images
from finetune.trainer.outputs.generation import step_callback
from finetune.trainer.process.stopping import Stopped, StopRequest
from finetune.trainer.telemetry.status import StatusReporter
from tests.fake_status_api import FakeApi
from tests.support import lora_job
from tests.unit.test_reporting import STATUS_PATH


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_a_heartbeat_moves_last_heartbeat_and_keeps_the_rest(api: FakeApi, tmp_path: Path) -> None:
    clock = Clock()
    sender = StatusReporter(
        api.url + STATUS_PATH, service_account_dir=tmp_path, interval=0, wall_clock=clock
    )
    try:
        sender.heartbeat()  # loading, class images: no step yet
        first = api.wait_for(1)[-1]["body"]["status"]["progress"]
        assert first == {"lastHeartbeat": "2026-12-02T10:00:00Z"}
        sender.progress(40, 100, 0.25, 8.0, 60)
        api.wait_for(2)
        clock.now += timedelta(minutes=45)  # the validation after step 40 samples on
        sender.heartbeat()
        beat = api.wait_for(3)[-1]["body"]["status"]["progress"]
        assert beat["lastHeartbeat"] == "2026-12-02T10:45:00Z"
        assert (beat["step"], beat["loss"], beat["etaSeconds"]) == (40, 0.25, 60)
    finally:
        sender.close()


def test_each_denoising_step_shows_the_run_alive_and_a_stop_ends_it() -> None:
    beats: list[int] = []
    each_step = step_callback(None, lambda: beats.append(1))
    tensors = {"latents": torch.zeros(1)}
    assert each_step(None, 0, 999, tensors) is tensors
    each_step(None, 1, 998, tensors)
    assert len(beats) == 2
    stop = StopRequest()
    try:
        stop.requested = True
        with pytest.raises(Stopped):
            step_callback(stop, lambda: beats.append(1))(None, 2, 997, tensors)
        assert len(beats) == 3  # alive first: the beat is not lost to the stop
    finally:
        stop.close()


class Pipeline:
    """A pipeline of `steps` denoising steps that makes blank images."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, prompt: str, num_images_per_prompt: int, **options: Any) -> Any:
        from PIL import Image

        for step in range(self.steps):
            options["callback_on_step_end"](self, step, 1000 - step, {})
        images = [Image.new("RGB", (8, 8)) for _ in range(num_images_per_prompt)]
        return type("Output", (), {"images": images})


def test_class_images_show_the_run_alive_at_each_denoising_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = lora_job()
    concept = document["spec"]["data"]["concepts"][0]
    concept.update(classPrompt="a photo of a disc", classImages={"count": 6})
    spec = TrainingSpec.model_validate(document["spec"])
    monkeypatch.setattr(class_images, "inference_pipeline", lambda components: Pipeline(3))
    beats: list[int] = []
    folder = tmp_path / "class"
    class_images.generate_missing(
        spec, None, [folder], torch.device("cpu"), torch.float32, lambda: beats.append(1)
    )
    assert len(list(folder.iterdir())) == 6
    assert len(beats) == 2 * 3  # two calls of 4 and 2 images, 3 steps each
