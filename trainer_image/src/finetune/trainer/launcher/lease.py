"""One run per output: a lease the launcher holds while its workers train.

A local output is leased with `fcntl.flock` on `.run/lease` in the output folder; the
kernel drops the lock when the holder dies however it dies, so a lock that can be
taken is never stale, and what the file still names is an earlier run that ended
without releasing it. An `s3://` output is leased with an object, `.run/lease.json`,
created by a conditional write (`If-None-Match: *`: only one creator wins) and
refreshed by a heartbeat thread; a lease whose heartbeat is older than its time to
live is expired and taken over (again conditionally, `If-Match` its ETag).

In a pod gang only node rank 0 leases the output: every node of one attempt writes
into the same output by design. A new attempt of the same job takes over its earlier
attempt's lease at once (the operator starts one only once the last is over); a
restarted pod of the same attempt waits for the lease to expire, and a pod whose
output is a shared volume waits up to the TTL for the flock (the last attempt's
processes ending). A run of anything else is refused with exit 2 naming the holder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from finetune.api import pod
from finetune.trainer.errors import DiskFull, JobInputError
from finetune.trainer.process import flock, stopping
from finetune.trainer.storage.s3 import S3Settings, S3Store, not_found

log = logging.getLogger(__name__)

# What every run keeps in its output (the lease, the plans): the mark of a folder runs
# write into.
RUN_FOLDER = ".run"
LOCAL_LEASE = f"{RUN_FOLDER}/lease"
S3_LEASE = f"{RUN_FOLDER}/lease.json"
# An S3 lease not refreshed for this long is expired; refreshed every quarter of it.
TTL_ENV = "FINETUNE_LEASE_TTL_SECONDS"
DEFAULT_TTL = 60.0
# How long a release waits for S3, at most, for the heartbeat and for the delete each.
RELEASE_SECONDS = 3.0


class OutputBusy(JobInputError):  # noqa: N818 - named for what the user meets
    """Another run holds the output: exit 2, naming it."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: str
    job: str = ""  # in a pod: namespace/name of the FineTuneJob
    attempt: int = 0

    @classmethod
    def me(cls) -> Holder:
        namespace, name = os.environ.get(pod.NAMESPACE_ENV), os.environ.get(pod.JOB_NAME_ENV)
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            since=datetime.now(UTC).isoformat(timespec="seconds"),
            job=f"{namespace}/{name}" if namespace and name else "",
            attempt=int(os.environ.get(pod.ATTEMPT_ENV, "0") or 0),
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(
                host=str(data["host"]),
                pid=int(data["pid"]),
                since=str(data["since"]),
                job=str(data.get("job", "")),
                attempt=int(data.get("attempt", 0)),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def __str__(self) -> str:
        job = f", job {self.job} attempt {self.attempt}" if self.job else ""
        return f"host {self.host}, pid {self.pid}, since {self.since}{job}"


def _busy(output: str, holder: Holder | None) -> OutputBusy:
    who = f"another run ({holder})" if holder else "another run"
    return OutputBusy(
        f"spec.output.uri: {output} is in use by {who}; wait for it to end or stop it, "
        "or write to another output (--output)"
    )


class LocalLease:
    """`wait` seconds: how long to wait for a holder to end before refusing (a pod of a
    new attempt on a shared volume, while the last attempt's processes wind down)."""

    def __init__(self, work_dir: Path, output: str, wait: float = 0.0) -> None:
        self.path = work_dir / LOCAL_LEASE
        self.output = output
        self.wait = wait
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as exc:  # a lease file another user's run left, a full disk...
            reason = exc.strerror or type(exc).__name__
            message = f"spec.output.uri: {self.path}: the run's lease cannot be written ({reason})"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(message) from exc
            raise JobInputError(
                f"{message}; make it writable, or remove it if no run uses the output"
            ) from exc

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        previous = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous is not None:
            log.warning(
                "%s: taking over the lease of a run that ended without releasing it (%s)",
                self.output,
                previous,
            )
        me = Holder.me().to_json().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        os.fsync(fd)
        self.fd = fd

    def _lock(self, fd: int) -> None:
        def announce() -> None:
            log.warning(
                "%s: waiting up to %.0f s for the run holding it to end (%s)",
                self.output,
                self.wait,
                Holder.parse(self.path.read_text()),
            )

        if not flock.take(fd, self.wait, announce):
            raise _busy(self.output, Holder.parse(self.path.read_text()))

    lost = False  # a lock held until this process ends cannot be taken over

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # a clean end: the next run has nothing to take over
        os.close(self.fd)  # closing drops the flock
        self.fd = None


class S3Lease:
    def __init__(self, output: str, settings: S3Settings, wait_for_own_job: bool) -> None:
        self.output = output
        self.settings = settings
        self.store = S3Store(output, settings)
        self.bucket = self.store.bucket
        self.key = self.store.prefix + S3_LEASE
        self.client = self.store.client
        self.ttl = float(os.environ.get(TTL_ENV, DEFAULT_TTL))
        self.wait_for_own_job = wait_for_own_job
        self.holder = Holder.me()
        self._etag: str | None = None
        self._why = ""
        self._lost = False  # taken over: the lease object is another run's now
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        """Taken over by another run (this one's heartbeats did not reach S3 for longer
        than the lease lives): the output is that run's now."""
        return self._lost

    def _put(self, **condition: str) -> str:
        answer = self.store.call(
            S3_LEASE,
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=self.holder.to_json().encode(), **condition
            ),
        )
        return str(answer["ETag"])

    def _read(self) -> tuple[Holder | None, str, float] | None:
        """The lease's holder, ETag and age in seconds (by S3's clock), if there is one."""

        def get() -> dict[str, Any] | None:
            try:
                answer = self.store.get_object(S3_LEASE)
            except Exception as exc:
                if not_found(exc):
                    return None
                raise
            answer["Text"] = answer["Body"].read().decode(errors="replace")
            return answer

        answer = self.store.call(S3_LEASE, get)
        if answer is None:
            return None
        date = answer["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        age = (now - answer["LastModified"]).total_seconds()
        return Holder.parse(answer["Text"]), str(answer["ETag"]), age

    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        waited = False
        while True:
            try:
                self._etag = self._put(IfNoneMatch="*")
                break
            except ClientError as exc:
                if not _precondition_failed(exc):
                    raise
            found = self._read()
            if found is None:
                continue  # released in between: try creating it again
            holder, etag, age = found
            if self._takes_over(holder, age):
                try:
                    self._etag = self._put(IfMatch=etag)
                except JobInputError:
                    continue  # released in between (no such key): look again
                except ClientError as exc:
                    if not _precondition_failed(exc):
                        raise
                    continue  # someone else took it over first: look again
                log.warning("%s: took over the lease of %s (%s)", self.output, holder, self._why)
                break
            if not (self.wait_for_own_job and holder and holder.job == self.holder.job):
                raise _busy(self.output, holder)
            if not waited:  # a restarted pod of this attempt: its lease runs out
                log.warning(
                    "%s: waiting up to %.0f s for the lease of %s to expire",
                    self.output,
                    self.ttl - age,
                    holder,
                )
                waited = True
            stopping.pause(min(5.0, max(0.5, self.ttl - age)))
        self._thread = threading.Thread(target=self._beat, name="output-lease", daemon=True)
        self._thread.start()

    def _takes_over(self, holder: Holder | None, age: float) -> bool:
        if age > self.ttl:
            self._why = f"no heartbeat for {age:.0f} s"
            return True
        if holder is None:
            self._why = "unreadable"
            return age > self.ttl
        me = self.holder
        if holder.host == me.host and not _alive(holder.pid):
            self._why = "its process is gone"
            return True
        if me.job and holder.job == me.job and holder.attempt < me.attempt:
            self._why = f"an earlier attempt ({holder.attempt}) of this job"
            return True
        return False

    def _beat(self) -> None:
        from botocore.exceptions import ClientError

        while not self._done.wait(self.ttl / 4):
            try:
                try:
                    self._etag = self._put(IfMatch=self._etag or "*")
                except Exception as exc:
                    if not (not_found(exc) or not_found(exc.__cause__)):
                        raise
                    # The object is gone (deleted, or a store that lost it): made again
                    # unless another run has made it meanwhile.
                    self._etag = self._put(IfNoneMatch="*")
                    log.warning("%s: the lease object was gone; made it again", self.output)
            except ClientError as exc:
                if _precondition_failed(exc) and not self._still_mine():
                    log.error("%s: the output's lease was taken over by another run", self.output)
                    self._lost = True
                    return
                log.warning("%s: lease heartbeat failed: %s", self.output, exc)
            except Exception as exc:  # an outage: the next beat tries again
                log.warning("%s: lease heartbeat failed: %s", self.output, exc)

    def _still_mine(self) -> bool:
        """After a refused refresh: whether the lease is this run's still, its ETag changed
        by this run's own write (a retry after an answer the network lost). Its ETag is
        taken then; losing a run to that would end it for nothing."""
        try:
            found = self._read()
        except Exception as exc:  # S3 out of reach still: the next beat asks again
            log.warning("%s: lease heartbeat failed: %s", self.output, exc)
            return True
        if found is None or found[0] != self.holder:
            return False
        self._etag = found[1]
        return True

    def release(self) -> None:
        """Delete the lease object, waiting for S3 at most about `RELEASE_SECONDS` twice:
        an endpoint that hangs must not keep a stopped run from exiting, and a lease left
        behind expires on its own (or is taken over by the next run of this host)."""
        self._done.set()
        if self._thread is None:
            return
        self._thread.join(timeout=RELEASE_SECONDS)
        beating = self._thread.is_alive()  # a heartbeat S3 does not answer
        self._thread = None
        if self._lost:
            return
        why = "S3 does not answer"
        if not beating:
            try:
                client = self.settings.client(RELEASE_SECONDS)
                client.delete_object(Bucket=self.bucket, Key=self.key)
                return
            except Exception as exc:
                why = str(exc)
        log.warning(
            "%s: could not release the lease (%s); it expires in %.0f s", self.output, why, self.ttl
        )


Lease = LocalLease | S3Lease


class OutputClaim:
    """The lease a launcher takes on its output (`prepare` calls it once the output
    checks pass) and holds until its workers are gone."""

    def __init__(self, wait_for_own_job: bool) -> None:
        self.wait_for_own_job = wait_for_own_job
        self.lease: Lease | None = None

    def __call__(self, output: str, work_dir: Path, settings: S3Settings) -> None:
        if output.startswith("s3://"):
            lease: Lease = S3Lease(output, settings, self.wait_for_own_job)
        else:
            wait = float(os.environ.get(TTL_ENV, DEFAULT_TTL)) if self.wait_for_own_job else 0.0
            lease = LocalLease(work_dir, output, wait)
        lease.acquire()
        self.lease = lease

    def lost(self) -> bool:
        """The lease was taken over by another run: this one must write no more."""
        return self.lease is not None and self.lease.lost

    def fds(self) -> tuple[int, ...]:
        """Descriptors the workers inherit: a local lock lasts until the last is gone."""
        if isinstance(self.lease, LocalLease) and self.lease.fd is not None:
            return (self.lease.fd,)
        return ()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def _precondition_failed(exc: Any) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return bool(error.get("Code") in {"PreconditionFailed", "412"} or status == 412)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
