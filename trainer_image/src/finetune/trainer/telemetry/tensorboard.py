"""TensorBoard event files under the output's `logs/` (rank 0), so `tensorboard --logdir
OUT/logs` shows a run as it does for every peer trainer: loss, learning rate and speed
at each step; each validation's scores (per concept too) and its sample grid.

Every run that logs something opens a new event file whose first event purges, in
TensorBoard's view, whatever an interrupted run logged after the checkpoint this one
resumes from (all of it for a run that starts over): the steps it trains again are not
shown twice; the train log drops the same lines (`telemetry.steps`). A finished run run
again logs nothing, and leaves no event file. With an `s3://` output the event file is
ended at each checkpoint and the next one opened by what is logged next
(`checkpoints.record`), so each goes to the output once, whole.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finetune.trainer.evaluation.scores import ALL, Scores

LOGS = "logs"
FLUSH_SECONDS = 10  # an event file a crash cuts short loses at most this much


def logs_folder(work_dir: Path) -> Path:
    return work_dir / LOGS


def scalar_tags(scores: Scores) -> dict[str, float]:
    """`validation/<metric>` over every sample, `validation/<metric>/<concept>` per concept,
    and an LCM student's `validation/<metric>@<n>steps` against its teacher."""
    tags = {
        f"validation/{metric}" + ("" if concept == ALL else f"/{concept}"): value
        for metric, concept, value in scores.labelled()
    }
    tags |= {f"validation/{metric}@{n}steps": value for metric, n, value in scores.by_steps()}
    return tags


class Board:
    """One run's event file, opened by the first thing logged; every call is cheap (the
    writer has its own thread)."""

    def __init__(self, folder: Path, resumed_step: int) -> None:
        self.folder = folder
        self._writer: Any = None
        # The first event file's first event purges later steps; the files after it
        # (`roll`) continue it.
        self._purge_step: int | None = resumed_step + 1
        self._opened = 0  # the second the last event file was opened in

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.folder.mkdir(parents=True, exist_ok=True)
            # TensorBoard reads event files in name order: by the second each was opened,
            # then a counter without padding (`.10` before `.9`). So never two in a second.
            time.sleep(max(0.0, self._opened + 1 - time.time()))
            self._writer = SummaryWriter(
                str(self.folder),
                purge_step=self._purge_step,
                flush_secs=FLUSH_SECONDS,
            )
            self._opened = int(time.time())  # its file's second, or a later one
            self._purge_step = None
        return self._writer

    def step(self, step: int, loss: float, learning_rate: float | None, speed: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        if learning_rate is not None:
            self.writer.add_scalar("train/learning_rate", learning_rate, step)
        self.writer.add_scalar("train/images_per_second", speed, step)

    def validation(
        self, step: int, scores: Scores | None, grid: Path | None, distillation_grid: Path | None
    ) -> None:
        if scores is not None:
            for tag, value in scalar_tags(scores).items():
                self.writer.add_scalar(tag, value, step)
        self._image("validation/samples", grid, step)
        self._image("validation/distillation", distillation_grid, step)  # lcm: teacher first
        if self._writer is not None:
            self._writer.flush()

    def _image(self, tag: str, path: Path | None, step: int) -> None:
        if path is None or not path.is_file():
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def roll(self) -> None:
        """End the event file, whole on disk; what is logged next opens another."""
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
