"""The output lease and the build lock on their own: who is refused, who takes over,
and what the warning says (local folders, and moto's S3 server over HTTP)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from finetune.trainer.engine import comm_op
from finetune.trainer.launcher.lease import LOCAL_LEASE, LocalLease, OutputBusy, S3Lease
from finetune.trainer.storage.s3 import S3Settings
from tests.trainer.s3faults import Moto, moto  # noqa: F401

OUTPUT = "s3://runs/job"
KEY = "job/.run/lease.json"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_local_lease_refuses_a_second_holder(tmp_path: Path) -> None:
    first = LocalLease(tmp_path, str(tmp_path))
    first.acquire()
    try:
        with pytest.raises(OutputBusy) as refused:
            LocalLease(tmp_path, str(tmp_path)).acquire()
        message = str(refused.value)
        assert message.startswith(f"spec.output.uri: {tmp_path} is in use by another run")
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in message
    finally:
        first.release()
    second = LocalLease(tmp_path, str(tmp_path))
    second.acquire()  # released: free again, with nothing to warn about
    second.release()


def test_a_lease_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    """A lease this run cannot write (a file another user's run left read-only; here
    `.run` is a file, which stops root too) is bad input naming it, not a traceback and
    exit 1."""
    from finetune.trainer.errors import JobInputError

    (tmp_path / ".run").write_text("not a folder")
    with pytest.raises(JobInputError) as refused:
        LocalLease(tmp_path, str(tmp_path)).acquire()
    assert str(refused.value) == (
        f"spec.output.uri: {tmp_path / LOCAL_LEASE}: the run's lease cannot be written "
        "(File exists); make it writable, or remove it if no run uses the output"
    )


def test_local_lease_of_a_dead_run_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run killed outright keeps no lock (the kernel drops it) but its file still names it."""
    pid = dead_pid()
    lease_file = tmp_path / LOCAL_LEASE
    lease_file.parent.mkdir(parents=True)
    lease_file.write_text(json.dumps({"host": "old-box", "pid": pid, "since": "yesterday"}))
    lease = LocalLease(tmp_path, str(tmp_path))
    with caplog.at_level(logging.WARNING):
        lease.acquire()
    try:
        assert (
            f"taking over the lease of a run that ended without releasing it (host old-box, pid {pid}"
            in caplog.text
        )
        assert json.loads(lease_file.read_text())["pid"] == os.getpid()
    finally:
        lease.release()


def test_a_pod_waits_for_the_local_lease_of_a_run_winding_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new attempt's pod on a shared volume waits (saying for what) while the last
    attempt's processes end, then takes the output; past its wait it is refused."""
    old = LocalLease(tmp_path, str(tmp_path))
    old.acquire()
    with pytest.raises(OutputBusy):
        LocalLease(tmp_path, str(tmp_path), wait=0.3).acquire()
    ended = threading.Timer(1.0, old.release)  # the old run ends while the new one waits
    ended.start()
    new = LocalLease(tmp_path, str(tmp_path), wait=60)
    with caplog.at_level(logging.WARNING):
        new.acquire()
    ended.join()
    try:
        assert f"waiting up to 60 s for the run holding it to end (host {socket.gethostname()}" in (
            caplog.text
        )
        assert json.loads((tmp_path / LOCAL_LEASE).read_text())["pid"] == os.getpid()
    finally:
        new.release()


@pytest.fixture
def bucket(moto: Moto) -> Moto:  # noqa: F811
    boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket="runs")
    return moto


def put_lease(url: str, **holder: object) -> None:
    body = json.dumps({"since": "2026-12-01T12:00:00+00:00", **holder}).encode()
    boto3.client("s3", endpoint_url=url).put_object(Bucket="runs", Key=KEY, Body=body)


def read_lease(url: str) -> dict[str, object]:
    body = boto3.client("s3", endpoint_url=url).get_object(Bucket="runs", Key=KEY)["Body"]
    return dict(json.loads(body.read()))


def test_s3_lease_is_exclusive_and_released(bucket: Moto) -> None:
    settings = S3Settings(bucket.url)
    first = S3Lease(OUTPUT, settings, wait_for_own_job=False)
    first.acquire()
    try:
        assert read_lease(bucket.url)["pid"] == os.getpid()
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()}, since "):
            S3Lease(OUTPUT, settings, wait_for_own_job=False).acquire()
    finally:
        first.release()
    with pytest.raises(Exception, match="NoSuchKey"):
        read_lease(bucket.url)


def test_an_s3_lease_whose_object_vanished_is_made_again(
    bucket: Moto, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease object deleted mid-run (by hand, or a store that lost it): the next
    heartbeat makes it again, so a second run is still refused."""
    monkeypatch.setenv("FINETUNE_LEASE_TTL_SECONDS", "1")
    lease = S3Lease(OUTPUT, S3Settings(bucket.url), wait_for_own_job=False)
    lease.acquire()
    try:
        boto3.client("s3", endpoint_url=bucket.url).delete_object(Bucket="runs", Key=KEY)
        deadline = time.monotonic() + 10
        with caplog.at_level(logging.WARNING):
            while "made it again" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                threading.Event().wait(0.1)
        assert read_lease(bucket.url)["pid"] == os.getpid()
        with pytest.raises(OutputBusy):
            S3Lease(OUTPUT, S3Settings(bucket.url), wait_for_own_job=False).acquire()
    finally:
        lease.release()


def test_s3_lease_release_gives_up_on_s3_that_hangs(
    bucket: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped run must not wait minutes on its way out: the release gives S3 seconds."""
    lease = S3Lease(OUTPUT, S3Settings(bucket.url), wait_for_own_job=False)
    lease.acquire()
    with socket.create_server(("127.0.0.1", 0)) as hung:  # takes connections, never answers
        lease.settings = S3Settings(f"http://127.0.0.1:{hung.getsockname()[1]}")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            lease.release()
        assert time.monotonic() - started < 10
    assert "could not release the lease" in caplog.text
    assert "it expires in 60 s" in caplog.text


def test_s3_lease_of_a_dead_process_on_this_host_is_taken_over(
    bucket: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    pid = dead_pid()
    put_lease(bucket.url, host=socket.gethostname(), pid=pid)
    lease = S3Lease(OUTPUT, S3Settings(bucket.url), wait_for_own_job=False)
    with caplog.at_level(logging.WARNING):
        lease.acquire()
    try:
        assert f"took over the lease of host {socket.gethostname()}, pid {pid}" in caplog.text
        assert "its process is gone" in caplog.text
        assert read_lease(bucket.url)["pid"] == os.getpid()
    finally:
        lease.release()


def test_s3_lease_without_heartbeat_expires(
    bucket: Moto, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another machine's lease that nobody refreshes: refused while fresh, taken over
    once older than its time to live (by S3's clock, so the machines' clocks do not matter)."""
    monkeypatch.setenv("FINETUNE_LEASE_TTL_SECONDS", "2")
    put_lease(bucket.url, host="gpu-box-7", pid=4242)
    with pytest.raises(OutputBusy, match="host gpu-box-7, pid 4242"):
        S3Lease(OUTPUT, S3Settings(bucket.url), wait_for_own_job=False).acquire()
    expired = threading.Event()
    expired.wait(3.5)  # the lease's age is what is tested: past its TTL, with S3's 1 s dates
    lease = S3Lease(OUTPUT, S3Settings(bucket.url), wait_for_own_job=False)
    with caplog.at_level(logging.WARNING):
        lease.acquire()
    try:
        assert "took over the lease of host gpu-box-7, pid 4242" in caplog.text
        assert "no heartbeat for" in caplog.text
    finally:
        lease.release()


def test_s3_lease_of_an_earlier_attempt_is_taken_over(
    bucket: Moto, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gang restarted by the operator takes over its dead attempt's lease at once."""
    put_lease(bucket.url, host="pod-0-a", pid=7, job="team/sd", attempt=1)
    monkeypatch.setenv("FINETUNE_NAMESPACE", "team")
    monkeypatch.setenv("FINETUNE_JOB_NAME", "sd")
    monkeypatch.setenv("FINETUNE_ATTEMPT", "2")
    lease = S3Lease(OUTPUT, S3Settings(bucket.url), wait_for_own_job=True)
    with caplog.at_level(logging.WARNING):
        lease.acquire()
    try:
        assert "an earlier attempt (1) of this job" in caplog.text
        assert read_lease(bucket.url)["attempt"] == 2
    finally:
        lease.release()
    # Another job's fresh lease is refused, also in a pod.
    put_lease(bucket.url, host="pod-0-b", pid=7, job="team/other", attempt=5)
    with pytest.raises(OutputBusy, match="job team/other attempt 5"):
        S3Lease(OUTPUT, S3Settings(bucket.url), wait_for_own_job=True).acquire()


def test_stale_build_lock_is_cleared_and_a_wait_is_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A torch build lock left by a killed build is removed (no live build can hold it
    while we hold the build flock), and waiting for a live build says so."""
    import fcntl

    monkeypatch.setenv(comm_op.EXTENSIONS_ENV, str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.touch()
    monkeypatch.setattr(comm_op, "_load", lambda: None)
    with (tmp_path / comm_op.BUILD_LOCK).open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another process is building
        builder = threading.Thread(target=comm_op.build_comm_op, daemon=True)
        builder.start()
        err = ""
        waiting = f"waiting for another process to finish building DeepSpeed's ops in {tmp_path}"
        deadline = time.monotonic() + 60
        while waiting not in err and time.monotonic() < deadline:
            builder.join(timeout=0.1)
            err += capsys.readouterr().err
        assert waiting in err
        assert stale.exists()  # not touched while another holds the build flock
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    builder.join(timeout=60)
    assert not builder.is_alive()
    assert not stale.exists()
    err += capsys.readouterr().err
    assert f"removing a build lock left by a killed build: {stale}" in err


def test_an_s3_lease_taken_over_is_known_lost_and_left_to_its_new_holder(
    bucket: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run took the lease over (this one's heartbeats had not reached S3 for
    longer than it lives): the next heartbeat finds it so, and the release leaves the
    other run's lease in place."""
    monkeypatch.setenv("FINETUNE_LEASE_TTL_SECONDS", "0.8")  # a heartbeat every 0.2 s
    lease = S3Lease(OUTPUT, S3Settings(bucket.url), wait_for_own_job=False)
    lease.acquire()
    try:
        # Its own holder under another ETag (a store whose ETags are no MD5, a retried
        # write whose answer was lost): still its own.
        own = json.dumps(dataclasses.asdict(lease.holder), indent=1)
        boto3.client("s3", endpoint_url=bucket.url).put_object(
            Bucket="runs", Key=KEY, Body=own.encode()
        )
        time.sleep(1.0)  # heartbeats
        assert not lease.lost
        put_lease(bucket.url, host="gpu-box-7", pid=4242)  # the other run's takeover
        deadline = time.monotonic() + 10
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.lost
    finally:
        lease.release()
    assert read_lease(bucket.url)["host"] == "gpu-box-7"
