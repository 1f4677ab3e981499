"""The output store's copy of a run's checkpoints, so they outlive the machine.

Every rank uploads, in the background, the files of a checkpoint it wrote (on a gang
each node has its own disk); rank 0 uploads the manifest last, and only once every
rank has uploaded its share: the ranks agree on that with one small all-reduce per
step while a checkpoint is pending. A checkpoint is durable once its manifest is in
the store. Resume takes the newest one there whose manifest parses and whose every
file matches it, unless a stop left a newer one unsent (a second Ctrl-C while the stop
waited for its uploads): that one, whole in the local folder, is resumed from and sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from finetune.trainer.checkpoints import manifest
from finetune.trainer.checkpoints.manifest import MANIFEST, Checkpoint
from finetune.trainer.process import distributed
from finetune.trainer.process.stopping import Stopped
from finetune.trainer.storage.store import Store
from finetune.trainer.storage.uploader import Task, Uploader

log = logging.getLogger(__name__)

PREFIX = "checkpoints/"
# `step-NNNNNNNN.unsent` beside the checkpoint folders: a stop left its uploads.
UNSENT = ".unsent"


def key_for(tag: str, relative: str) -> str:
    return f"{PREFIX}{tag}/{relative}"


def tag_of(key: str) -> str:
    """`step-NNNNNNNN` for a key `checkpoints/step-NNNNNNNN/...`, else ""."""
    parts = key.split("/")
    return parts[1] if len(parts) > 2 and parts[1].startswith("step-") else ""


def durable_tags(keys: list[str]) -> list[str]:
    """The checkpoints among the store's `keys` whose manifest is there, oldest first."""
    manifests = (key for key in keys if key.endswith("/" + MANIFEST))
    return sorted({tag_of(key) for key in manifests} - {""})


class Replica:
    def __init__(
        self,
        store: Store,
        root: Path,
        rank: distributed.Rank,
        device: torch.device,
        durable: Callable[[int], None],
    ) -> None:
        """`durable(step)` runs on rank 0's uploader thread once `step`'s manifest is up."""
        self.store = store
        self.root = root
        self.rank = rank
        self.device = device
        self.durable = durable
        self.uploader = Uploader(store)
        self.pending: list[int] = []  # files handed over, manifest not yet

    def location(self, tag: str) -> str:
        return self.store.uri_of(PREFIX + tag)

    # --- saving --------------------------------------------------------------------

    def upload(self, step: int, names: list[str], beside: Sequence[tuple[Path, str]] = ()) -> None:
        """On every rank: upload its files `names` of `step`'s checkpoint, and `beside`
        ((local path, key) elsewhere in the store: the run's record) before its manifest."""
        tag = manifest.tag_for(step)
        folder = self.root / tag
        files = [(folder / name, key_for(tag, name)) for name in names]
        self.uploader.submit(Task(step, files + list(beside)))
        self.pending.append(step)

    def poll(self) -> None:
        """On every rank at each step boundary: hand over the manifests of checkpoints
        every rank has uploaded its share of. A collective only while one is pending."""
        self.uploader.check()
        if not self.pending:
            return
        through = distributed.minimum(self.uploader.uploaded_through(), self.device)
        ready = [step for step in self.pending if step <= through]
        self.pending = [step for step in self.pending if step > through]
        if self.rank.main:
            for step in ready:
                tag = manifest.tag_for(step)
                self.uploader.submit(
                    Task(
                        step,
                        [(self.root / tag / MANIFEST, key_for(tag, MANIFEST))],
                        then=lambda step=step: self._sent(step),  # type: ignore[misc]
                        urgent=True,
                    )
                )

    def _sent(self, step: int) -> None:
        """Rank 0's uploader thread, once `step`'s manifest is up."""
        for marker in self.root.glob(f"step-*{UNSENT}"):  # left ones it makes obsolete
            if marker.name.removesuffix(UNSENT) <= manifest.tag_for(step):
                marker.unlink(missing_ok=True)
        self.durable(step)

    def finish(self, check: Callable[[], None] = lambda: None) -> None:
        """On every rank: wait until every checkpoint saved so far is durable. Every rank
        walks the same pending list, so each makes the same collectives. `check()` runs
        while waiting; when it raises `Stopped` (a repeated stop) the checkpoints not
        durable yet are marked for the next run to send, and it is raised on."""
        try:
            while self.pending:
                self.uploader.wait_for(self.pending[0], check)
                self.poll()
            self.uploader.wait(check)
        except Stopped:
            if self.rank.main:
                for step in self.unsent():
                    (self.root / (manifest.tag_for(step) + UNSENT)).touch()
            raise

    def unsent(self) -> list[int]:
        """The checkpoints saved here whose manifest is not in the store yet."""
        return sorted(set(self.pending) | self.uploader.waiting_steps())

    def resend(self, checkpoint: Checkpoint, beside: Sequence[tuple[Path, str]] = ()) -> None:
        """On every rank: upload `checkpoint`, which a stop left unsent (`restore`), as if
        just saved (with `beside`, as `upload`). Rank 0 verified every file of it in the
        local folder and sends them all."""
        names = []
        if self.rank.main:
            _, files = manifest.parse((checkpoint.folder / MANIFEST).read_text())
            names = [relative for relative, _, _ in files]
        self.upload(checkpoint.step, names, beside)

    # --- retention -----------------------------------------------------------------

    def _keys(self) -> list[str]:
        return [key for key, _ in self.store.keys(PREFIX)]

    def counted(self) -> list[str]:
        """The tags of the checkpoints in the store whose manifest is there, oldest first."""
        return durable_tags(self._keys())

    def retain(
        self, keep_last: int, keep: str | None = None, corrupt: frozenset[str] = frozenset()
    ) -> str | None:
        """Delete from the store every checkpoint older than the newest `keep_last`
        durable ones (`corrupt` ones, found so at resume, do not count) but `keep` (the
        best, `keepBest`), with one listing; the oldest tag kept, or None when none is
        deleted."""
        keys = self._keys()
        durable = [tag for tag in durable_tags(keys) if tag not in corrupt]
        if len(durable) <= keep_last:
            return None
        oldest_kept = durable[-keep_last]
        stale = [key for key in keys if "" < tag_of(key) < oldest_kept and tag_of(key) != keep]
        # The manifests first: a checkpoint half deleted is never taken for a good one.
        stale.sort(key=lambda key: not key.endswith("/" + MANIFEST))
        self.store.delete(stale)
        return oldest_kept

    # --- resuming ------------------------------------------------------------------

    def restore(self) -> tuple[manifest.Scan, bool]:
        """Rank 0: what to resume from, and whether it is still to be sent (`resend`).
        That is the newest checkpoint a stop left unsent, when it is newer than the
        store's newest and verifies in the local folder; else the newest in the store
        whose manifest parses and whose files all match it, fetched into the local folder
        (files already there with the right SHA-256 are not downloaded again), with the
        newer durable ones that do not."""
        tags = durable_tags(self._keys())
        unsent = self._left_unsent(tags[-1] if tags else "")
        if unsent is not None:
            log.info("checkpoint %s was never uploaded (a stop left it): sending it", unsent.tag)
            return manifest.Scan(unsent, {}), True
        corrupt: dict[str, str] = {}
        for tag in reversed(tags):
            try:
                return manifest.Scan(self._fetch(tag), corrupt), False
            except manifest.Unusable as why:
                log.warning("checkpoint %s is not used: %s", self.location(tag), why)
                corrupt[tag] = str(why)
        return manifest.Scan(None, corrupt), False

    def _left_unsent(self, newest_stored: str) -> Checkpoint | None:
        """The newest checkpoint a stop left unsent that is newer than `newest_stored`
        and whole here; the marks of those that are not are dropped."""
        for marker in sorted(self.root.glob(f"step-*{UNSENT}"), reverse=True):
            folder = self.root / marker.name.removesuffix(UNSENT)
            if folder.name > newest_stored:
                step = manifest.verify(folder)
                if step is not None:
                    return Checkpoint(folder, step)
                log.warning("checkpoint %s, left unsent by a stop, is not whole; not used", folder)
            marker.unlink()
        return None

    def fetch(self, tag: str) -> Checkpoint | None:
        """`tag`'s files in the local folder, each checked against the store's manifest;
        None (with a warning naming the object) when one does not match."""
        try:
            return self._fetch(tag)
        except manifest.Unusable as why:
            log.warning("checkpoint %s: %s", self.location(tag), why)
            return None

    def _fetch(self, tag: str) -> Checkpoint:
        """`fetch`, or `Unusable` naming the object that does not match."""
        text = self.store.read_text(key_for(tag, MANIFEST))
        try:
            step, files = manifest.parse(text or "")
        except (ValueError, KeyError, TypeError) as error:
            raise manifest.Unusable(
                f"{self.store.uri_of(key_for(tag, MANIFEST))} is not a readable manifest"
            ) from error
        folder = self.root / tag
        for relative, size, sha256 in files:
            path = folder / relative
            if manifest.matches(path, size, sha256):
                continue
            self.store.get_file(key_for(tag, relative), path)
            if not manifest.matches(path, size, sha256):
                path.unlink(missing_ok=True)
                raise manifest.Unusable(
                    f"{self.store.uri_of(key_for(tag, relative))} does not match its manifest "
                    "(size or SHA-256)"
                )
        manifest.write_text(folder, text or "")
        return Checkpoint(folder, step)
