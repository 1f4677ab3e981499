"""A run's record (its train log, validation samples and TensorBoard event files) in an
`s3://` output as of each checkpoint, so a run resumed on another machine continues the
record rather than starting a new one.

Rank 0 hands the record's new files to the checkpoint's upload, before its manifest:
so once a checkpoint counts, the record up to its step is in the output too, where the
results keep it (`samples/`, `logs/`, `train_log.jsonl`); the results' upload at the end
then sends only what is not there yet, the model card last as before. What goes up with
each checkpoint is what is new since the last: the sample folders of validations made
since, TensorBoard's event file of the steps since (one is ended at each checkpoint, so
each is sent once, whole) and the train log (a few hundred bytes a step, sent whole).

On resume from step N, what the local folder lacks comes back from the output before
the train log is trimmed to step N (`telemetry.steps`): the output's train log where the
local one does not reach N (a fresh machine), and the sample folders of steps up to N.
TensorBoard's earlier event files stay in the output (nothing reads them locally).
A local output is the run's own folder: it needs none of this.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from finetune.trainer.storage.files import file_for_key, is_partial, write_text_whole
from finetune.trainer.storage.store import Store
from finetune.trainer.telemetry.tensorboard import LOGS
from finetune.trainer.telemetry.train_log import entries

if TYPE_CHECKING:
    from finetune.trainer.telemetry.tensorboard import Board

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
SAMPLES = "samples"
# The train log as the newest checkpoint saw it, in the checkpoints' folder: what its
# upload sends while training appends to the real one.
SENT_LOG = "train_log.sent.jsonl"
_STEP_FOLDER = re.compile(r"step-(\d+)$")


def sample_step(key: str) -> int:
    """The step of a sample under `samples/step-NNNNNNNN/`; 0 for one beside the step
    folders (an LCM teacher's images, `samples/teacher/`), which every step has."""
    parts = PurePosixPath(key).parts
    found = _STEP_FOLDER.match(parts[1]) if len(parts) > 2 else None
    return int(found.group(1)) if found else 0


def last_step(text: str) -> int:
    """The newest step a train log's complete lines record; 0 for none."""
    return max((e["step"] for e in entries(text) if isinstance(e.get("step"), int)), default=0)


@dataclass(frozen=True)
class Copy:
    """A local file's copy in the output: its size, and its local modification time
    when this process sent or fetched it (the copy is then known to be the same bytes);
    None when only found there with the same size at resume."""

    size: int
    mtime_ns: int | None


class RunRecord:
    """Rank 0's record of a run working in `work_dir` for the output `store`."""

    def __init__(self, work_dir: Path, store: Store, checkpoints: Path) -> None:
        self.work_dir = work_dir
        self.store = store
        self.sent_log = checkpoints / SENT_LOG
        self.board: Board | None = None  # ended at each checkpoint (`files`)
        self.copies: dict[str, Copy] = {}  # key -> the copy the output holds

    # --- with each checkpoint ------------------------------------------------------

    def files(self, step: int) -> list[tuple[Path, str]]:
        """Rank 0, at `step`'s checkpoint: (local path, key) of what the output lacks of
        the record up to `step`, the train log last. Each is taken to be there from now
        on: a failed upload fails the run, and the checkpoint counts only once all are up."""
        if self.board is not None:
            self.board.roll()  # its event file, ended, goes up once
        new = [
            (path, key)
            for path, key in self._local(step)
            if not self._sent(path, key, assumed=True)
        ]
        for path, key in new:
            stat = path.stat()
            self.copies[key] = Copy(stat.st_size, stat.st_mtime_ns)
        train_log = self.work_dir / TRAIN_LOG
        if train_log.is_file():
            write_text_whole(self.sent_log, train_log.read_text())
            new.append((self.sent_log, TRAIN_LOG))
        return new

    def holds(self, path: Path, key: str) -> bool:
        """Whether the output's `key` is known to hold `path`'s bytes as they are now (this
        process sent or fetched them): the results' upload leaves it out."""
        return self._sent(path, key, assumed=False)

    def _sent(self, path: Path, key: str, assumed: bool) -> bool:
        copy = self.copies.get(key)
        if copy is None:
            return False
        stat = path.stat()
        if copy.mtime_ns is None:
            return assumed and copy.size == stat.st_size
        return (copy.size, copy.mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    def _local(self, step: int) -> Iterator[tuple[Path, str]]:
        """The record's files here: samples of steps up to `step` (a later step's are a
        run's that ended before its checkpoint), and TensorBoard's event files."""
        for top in (SAMPLES, LOGS):
            folder = self.work_dir / top
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                key = path.relative_to(self.work_dir).as_posix()
                if not path.is_file() or is_partial(path):
                    continue
                if top == SAMPLES and sample_step(key) > step:
                    continue
                yield path, key

    def forget(self, folder: Path) -> None:
        """Rank 0, before the samples in `folder` (a step's) are made again: the
        output's copies of the earlier ones deleted, so none of a prompt since removed
        stays there (or comes back with a later resume)."""
        prefix = folder.relative_to(self.work_dir).as_posix() + "/"
        there = [key for key, _ in self.store.keys(prefix)]
        if there:
            self.store.delete(there)
        for key in [k for k in self.copies if k.startswith(prefix)]:
            del self.copies[key]

    # --- on resume -----------------------------------------------------------------

    def restore(self, step: int) -> None:
        """Rank 0, resuming from `step`'s checkpoint: from the output, what the local
        folder lacks of the record up to `step` (a fresh machine lacks it all)."""
        self._restore_log(step)
        fetched = 0
        for key, size in self.store.keys(SAMPLES + "/"):
            path = file_for_key(self.work_dir, key)
            if path is None or sample_step(key) > step:
                continue  # not a sample's name, or a run's that ended before its checkpoint
            if path.is_file() and path.stat().st_size == size:
                self.copies[key] = Copy(size, None)
                continue
            self.store.get_file(key, path)
            self.copies[key] = Copy(size, path.stat().st_mtime_ns)
            fetched += 1
        for key, size in self.store.keys(LOGS + "/"):
            path = file_for_key(self.work_dir, key)
            if path is not None and path.is_file() and path.stat().st_size == size:
                self.copies[key] = Copy(size, None)
        if fetched:
            log.info(
                "%d sample file(s) of steps up to %d fetched from %s", fetched, step, self.store.uri
            )

    def _restore_log(self, step: int) -> None:
        """The output's train log in place of a local one that does not reach `step`."""
        local = self.work_dir / TRAIN_LOG
        here = last_step(local.read_text()) if local.is_file() else 0
        if here >= step:
            return
        text = self.store.read_text(TRAIN_LOG) or ""
        there = last_step(text)
        if there > here:
            write_text_whole(local, text, durable=True)
            log.info("the train log up to step %d fetched from %s", there, self.store.uri)
        if max(here, there) < step:
            log.warning(
                "the train log (here and in %s) records steps up to %d only, not %d: the "
                "steps between are missing from it",
                self.store.uri,
                max(here, there),
                step,
            )
