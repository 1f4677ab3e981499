"""Stopping a run whose S3 endpoint hangs: moto's S3 server, a process of its own, is
SIGSTOPped (it takes connections and never answers). Ctrl-C still checkpoints and says it
waits for the upload; a second Ctrl-C leaves it, exit 130 within seconds, the local
checkpoint kept; once S3 answers again the same command uploads that checkpoint and
finishes from it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import boto3
import pytest

from finetune.trainer.checkpoints import manifest
from tests.trainer.jobs import FINETUNE, finetune_run
from tests.trainer.processes import kill_tree
from tests.trainer.s3faults import CREDENTIALS, free_port
from tests.trainer.test_durable_checkpoints import OUTPUT, manifests, s3_job, work_dir

pytestmark = pytest.mark.slow

MOTO_SERVER = Path(sys.executable).parent / "moto_server"


@pytest.fixture
def moto_process() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """moto's S3 server in a process of its own (one a test may SIGSTOP), and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                assert server.poll() is None, "moto exited"
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.2)
        yield server, url
    finally:
        with suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_until(condition: Callable[[], bool], run: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert run.poll() is None, f"the run ended first ({run.returncode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# With two ranks, one waits for the other in a collective when the second stop comes.
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_second_ctrl_c_leaves_a_hung_upload_and_a_rerun_sends_it(
    nproc: int,
    tmp_path: Path,
    moto_process: tuple[subprocess.Popen[bytes], str],
    tiny_model: Path,
    disc_images: Path,
) -> None:
    server, url = moto_process
    client = boto3.client("s3", endpoint_url=url, **credentials())
    client.create_bucket(Bucket="runs")
    long = {"training": {"maxSteps": 400}, "checkpointing": {"everyNSteps": 200}}
    job = s3_job(tmp_path, tiny_model, disc_images, url, **long)
    env = {
        **os.environ,
        **CREDENTIALS,
        "FINETUNE_CACHE_DIR": str(tmp_path / "cache"),
        "FINETUNE_S3_RETRY_SECONDS": "600",
    }
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        run = subprocess.Popen(
            [str(FINETUNE), "run", str(job), "--nproc", str(nproc)], env=env, stdout=out, stderr=err
        )
    try:
        log = work_dir(job) / "train_log.jsonl"
        wait_until(lambda: log.exists() and log.read_text().strip() != "", run, 600)
        os.kill(server.pid, signal.SIGSTOP)  # S3 hangs: connections taken, never answered
        run.send_signal(signal.SIGINT)
        waiting = f"Stopping: waiting for 1 checkpoint upload(s) to {OUTPUT}; press Ctrl-C again"
        wait_until(lambda: waiting in stdout.read_text(), run, 120)

        run.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code = run.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        kill_tree(run)
        run.wait()
    output = stdout.read_text() + stderr.read_text()
    assert code == 130, output[-3000:]
    assert took < 15, f"exited {took:.1f} s after the second Ctrl-C:\n{output[-3000:]}"
    assert "(the local checkpoint is kept and a rerun uploads it)" in output
    assert "Traceback" not in output, output[-3000:]  # leaving was asked for: no failure
    stopped = re.search(r"Stopped at step (\d+); checkpoint (\S+) is kept but not uploaded", output)
    assert stopped is not None, output[-3000:]
    step = int(stopped.group(1))
    folder = work_dir(job) / "checkpoints" / manifest.tag_for(step)
    assert stopped.group(2) == str(folder)
    assert manifest.verify(folder) == step, "the local checkpoint is not whole"

    os.kill(server.pid, signal.SIGCONT)
    assert manifests(client) == []  # nothing reached S3 while it hung
    # The same job, to end at the step it stopped at: resumed from the local checkpoint,
    # which goes up first, then the results.
    job = s3_job(
        tmp_path,
        tiny_model,
        disc_images,
        url,
        training={"maxSteps": step},
        checkpointing={"everyNSteps": step},
    )
    rerun = finetune_run(job, nproc=nproc, env=CREDENTIALS)
    assert f"resumed from {folder} (step {step})" in rerun.stderr
    assert manifests(client) == [manifest.tag_for(step)]
    assert "job/README.md" in {o["Key"] for o in client.list_objects_v2(Bucket="runs")["Contents"]}
    assert not list(folder.parent.glob("*.unsent")), "the mark outlived the upload"


def credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }
