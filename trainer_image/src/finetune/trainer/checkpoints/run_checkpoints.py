"""A run's checkpoints, one path whatever the output: every rank saves its share into
the local folder, rank 0 writes the manifest last; with a remote output (S3) the
checkpoint is also copied to the store, and only counts once its manifest is there
(a local output *is* the local folder: nothing to copy). Once a checkpoint counts,
keep-last-N retention applies and it is reported. Resume takes the newest valid
checkpoint, from the store when there is one, and refuses one laid out otherwise.

With a replica and `record_of` (the run's folder), the run's record (train log, samples,
TensorBoard files) goes up with each checkpoint and comes back on resume
(`checkpoints.record`), so a resume on another machine continues it.

With `checkpointing.keepBest` retention also keeps the checkpoint of the best validation,
as the manifest of the checkpoint that just counted says (each carries the run's
validations so far), and `load` brings a kept checkpoint's weights back at the end.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.api.selection import KeepBest
from finetune.trainer.checkpoints import manifest
from finetune.trainer.checkpoints.layout import check_layout
from finetune.trainer.checkpoints.manifest import MANIFEST, Checkpoint
from finetune.trainer.checkpoints.record import RunRecord
from finetune.trainer.checkpoints.replica import Replica
from finetune.trainer.checkpoints.space import space_checked
from finetune.trainer.checkpoints.state import TrainingState
from finetune.trainer.errors import JobInputError
from finetune.trainer.evaluation.selection import best_of, from_manifest
from finetune.trainer.process import distributed
from finetune.trainer.storage.store import Store
from finetune.trainer.storage.uploader import Uploader

if TYPE_CHECKING:
    from finetune.trainer.telemetry.tensorboard import Board

log = logging.getLogger(__name__)

# A checkpoint folder retention is deleting is first renamed so: what a crash or an
# undeletable file (NFS's `.nfs*`) leaves of it is never taken for a save cut short.
DELETING = ".deleting-"


def owned(mine: list[str], everyone: list[list[str]], rank: int) -> list[str]:
    """The files this rank describes (and uploads): those it is the lowest rank to see
    (on a shared disk rank 0 sees them all; on separate disks each rank only its own)."""
    first: dict[str, int] = {}
    for index, names in enumerate(everyone):
        for name in names:
            first.setdefault(name, index)
    return [name for name in mine if first[name] == rank]


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder, renamed out of the checkpoints' names first (at once):
    a folder left half deleted would look like a save cut short."""
    doomed = folder.with_name(DELETING + folder.name)
    try:
        folder.rename(doomed)
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


@dataclass
class NoUploads:
    """A local output's uploads: none."""

    bytes_sent: int = 0
    seconds: float = 0.0


class RunCheckpoints:
    """Made before the model loads: the newest checkpoint is checked against the run
    (`layout.check_run`) and decides how the engine is set up (its ZeRO stage). From
    `resume` on, the checkpoints of `state`."""

    def __init__(
        self,
        root: Path,
        rank: distributed.Rank,
        device: torch.device,
        keep_last: int,
        replica: Store | None = None,
        report: Callable[[str, int], None] | None = None,
        keep_best: KeepBest | None = None,
        record_of: Path | None = None,
        basis: str | None = None,
    ) -> None:
        """`replica`: the remote output's store; `report(where, step)`: a checkpoint counts;
        `keep_best`: the metric whose best checkpoint outlives `keep_last`; `record_of`:
        the run's folder, whose record goes to the replica with each checkpoint; `basis`:
        the run's validation settings (`settings_basis`), the scores `keep_best` weighs."""
        self.root = root
        self.rank = rank
        self.device = device
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.basis = basis
        self.report = report
        self.replica = (
            Replica(replica, root, rank, device, self._durable) if replica is not None else None
        )
        # Rank 0's, with a replica.
        self.record = (
            RunRecord(record_of, replica, root)
            if replica is not None and record_of is not None and rank.main
            else None
        )
        self._state: TrainingState | None = None
        self.layout: dict[str, Any] = {}
        # Rank 0: checkpoints resume found corrupt; retention does not count them as kept
        # (until a save writes the same step again).
        self.corrupt: frozenset[str] = frozenset()

    @property
    def state(self) -> TrainingState:
        assert self._state is not None, "resume() comes before the first save"
        return self._state

    # --- saving --------------------------------------------------------------------

    def save(
        self,
        step: int,
        validations: list[dict[str, Any]] | None = None,
        loss: float | None = None,
    ) -> Path:
        """On every rank: `step`'s checkpoint, in the local folder it returns.
        `validations`: rank 0's scores so far, and `loss`, `step`'s, for the manifest."""
        tag = manifest.tag_for(step)
        folder = self.root / tag
        if self.rank.main:  # a manifest left by an earlier run must not vouch for new files
            (folder / MANIFEST).unlink(missing_ok=True)
            self.corrupt -= {tag}
        distributed.barrier()
        with space_checked(folder, step):
            self.state.save(self.root, tag, step, self.rank.rank)
        distributed.barrier()
        with space_checked(folder, step):
            mine = self._write_manifest(step, validations, loss)
            record = self._record_files(step)
        if self.replica is not None:  # it counts once every rank's files are up: `poll`
            self.replica.upload(step, mine, record)
        elif self.rank.main:
            self._durable(step)
        distributed.barrier()
        return folder

    def carry_board(self, board: Board | None) -> None:
        """Rank 0's TensorBoard writer: with a record, its event file is ended at each
        checkpoint and goes up with it."""
        if self.record is not None:
            self.record.board = board

    def _record_files(self, step: int) -> list[tuple[Path, str]]:
        return self.record.files(step) if self.record is not None else []

    def _write_manifest(
        self, step: int, validations: list[dict[str, Any]] | None, loss: float | None
    ) -> list[str]:
        """Each rank describes the files it owns; rank 0 writes them all in the manifest.
        This rank's files."""
        folder = self.root / manifest.tag_for(step)
        names = manifest.files_in(folder)
        mine = owned(names, distributed.all_gather(names), self.rank.rank)
        entries = manifest.describe(folder, mine)
        everything = [e for part in distributed.all_gather(entries) for e in part]
        if self.rank.main:
            manifest.write_manifest(folder, step, self.layout, everything, validations, loss)
        return mine

    def poll(self) -> None:
        """On every rank at each step boundary: copies that are complete now count."""
        if self.replica is not None:
            self.replica.poll()

    def finish(self, check: Callable[[], None] = lambda: None) -> None:
        """On every rank: wait until every checkpoint saved so far counts. `check()` runs
        while waiting; what it raises leaves the uploads (`Replica.finish`)."""
        if self.replica is not None:
            self.replica.finish(check)

    def unsent(self) -> list[int]:
        """The checkpoints saved that do not count yet, waiting for their upload."""
        return self.replica.unsent() if self.replica is not None else []

    @property
    def uploads(self) -> Uploader | NoUploads:
        """This rank's uploads so far: bytes sent and seconds spent."""
        return self.replica.uploader if self.replica is not None else NoUploads()

    def _durable(self, step: int) -> None:
        """Rank 0 (its uploader thread with a replica), once `step`'s checkpoint counts."""
        tag = manifest.tag_for(step)
        if self.replica is not None:
            where = self.replica.location(tag)
            log.info("checkpoint %s is durable in %s", tag, self.replica.store.uri)
        else:
            where = str(self.root / tag)
        self._retain(step)
        if self.report is not None:
            self.report(where, step)

    def _retain(self, step: int) -> None:
        """Keep the newest `keep_last` checkpoints that count (and anything newer, which
        may still be saving or uploading) and the best one; delete everything older, in
        the store and locally."""
        best = self.best_tag(step)
        if self.replica is not None:
            oldest_kept = self.replica.retain(self.keep_last, best, self.corrupt)
        else:
            complete = [tag for tag in self._complete() if tag not in self.corrupt]
            oldest_kept = complete[-self.keep_last] if len(complete) > self.keep_last else None
        if oldest_kept is None:
            return
        for folder in self._folders():
            if folder.name < oldest_kept and folder.name != best:
                remove_checkpoint(folder)
        for left in self.root.glob(DELETING + "*"):  # an earlier deletion's remains
            shutil.rmtree(left, ignore_errors=True)

    def kept(self) -> set[int]:
        """Rank 0: the steps whose checkpoint counts (in the store with a replica, else
        here), but those found corrupt: the weights `load` can bring back."""
        tags = self.replica.counted() if self.replica is not None else self._complete()
        return {manifest.step_of(tag) for tag in tags if tag not in self.corrupt}

    def best_tag(self, step: int) -> str | None:
        """The checkpoint of the best validation by `keepBest` among those scored with the
        run's settings, as `step`'s manifest records them (only validation steps have one
        with keepBest); None without."""
        if self.keep_best is None:
            return None
        history = from_manifest(manifest.validations_of(self.root / manifest.tag_for(step)))
        comparable = [s for s in history if s.comparable(self.basis)]
        best = best_of(comparable, self.keep_best.metric, self.keep_best.mode)
        return manifest.tag_for(best.step) if best is not None else None

    def _folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def _complete(self) -> list[str]:
        return [p.name for p in self._folders() if (p / MANIFEST).exists()]

    # --- resuming ------------------------------------------------------------------

    def resume(self, found: Checkpoint | None, state: TrainingState, layout: dict[str, Any]) -> int:
        """On every rank: the step to go on from, with `found` (from `newest`) loaded into
        `state`, or 0 when there is none. `layout`: what it must share with this run."""
        self._state, self.layout = state, layout
        if found is None:
            return 0
        check_layout(found, layout, self.location(found.tag))
        if self.record is not None:  # before the train log is trimmed to its step
            self.record.restore(found.step)
        state.load(self.root, found.tag, self.rank.rank, self.device)
        if self.rank.main:
            log.info("resumed from %s (step %d)", found.folder, found.step)
        return found.step

    def load(self, step: int) -> bool:
        """On every rank: `step`'s checkpoint (a kept best) loaded back into the training
        state, fetched from the store where a node's disk lacks it; False on every rank,
        nothing loaded, when it is gone."""
        tag = manifest.tag_for(step)
        folder = self.root / tag
        here = True
        # Rank 0 first, then the first rank of each other node: on a shared disk the
        # others find rank 0's copy and fetch nothing.
        for turn in (True, False):
            if self.rank.local_rank == 0 and self.rank.main == turn:
                here = (folder.is_dir() and manifest.verify(folder) == step) or (
                    self.replica is not None and self.replica.fetch(tag) is not None
                )
            distributed.barrier()
        if distributed.minimum(int(here), self.device) < 1:
            return False
        self.state.load(self.root, tag, self.rank.rank, self.device)
        return True

    def location(self, tag: str) -> str:
        """Checkpoint `tag` (or with "" the folder of them all) where the user keeps it: in
        the store for an `s3://` output, not the local cache it is fetched into."""
        return self.replica.location(tag) if self.replica is not None else str(self.root / tag)

    def newest(self) -> Checkpoint | None:
        """Rank 0's pick, on every rank: with a replica the newest checkpoint there
        (fetched into the local folder) or a newer one a stop left unsent (sent now);
        else the newest local one that verifies. When there are checkpoints but every one
        is corrupt, JobInputError on every rank."""
        scan: manifest.Scan
        scan, unsent = distributed.broadcast(
            (self.replica.restore() if self.replica else (manifest.scan(self.root), False))
            if self.rank.main
            else None
        )
        self.corrupt = frozenset(scan.corrupt)
        found = scan.resumable(self.location(""))
        if unsent and found is not None and self.replica is not None:
            # Rank 0 has every rank's files of it on its disk: one every node shares.
            self.replica.resend(found, self._record_files(found.step))
        # Another node has a disk of its own (on a shared one nothing is fetched again).
        other_node = not self.rank.main and self.rank.local_rank == 0 and not unsent
        fetched = (
            self.replica.fetch(found.tag)
            if found is not None and self.replica is not None and other_node
            else found
        )
        if fetched is None and found is not None:
            raise JobInputError(f"{found.folder}: the checkpoint changed while resuming")
        distributed.barrier()
        return found
