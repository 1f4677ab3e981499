"""`finetune run` as processes, with real signals: a second run into a busy output is
refused naming the holder while the first trains exactly as it would alone, the workers
die with a SIGKILLed launcher, and SIGHUP (a closed terminal) stops like Ctrl-C, with a
checkpoint and exit 130, also when it comes from a terminal that closed."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune.trainer.checkpoints import manifest
from finetune.trainer.launcher.lease import LocalLease, OutputBusy
from tests.trainer.jobs import FINETUNE, finetune_run, job_file, train_log
from tests.trainer.processes import alive, children_of

pytestmark = pytest.mark.slow

# Long enough to still be training when the test acts; the test never waits for the end.
WEIGHTS = "pytorch_lora_weights.safetensors"
LONG: dict[str, Any] = {"training": {"maxSteps": 400}, "checkpointing": {"everyNSteps": 200}}


class Run:
    """`finetune run` in the background, its output in files (a full pipe would stall it);
    `finetune train` (a pod's node) where `pod_env` gives its gang's environment."""

    def __init__(self, job: Path, nproc: int = 1, pod_env: dict[str, str] | None = None) -> None:
        self.folder = job.parent
        env = {**os.environ, "FINETUNE_CACHE_DIR": str(self.folder / "cache"), **(pod_env or {})}
        self.stdout = (self.folder / "stdout.txt").open("w")
        self.stderr = (self.folder / "stderr.txt").open("w")
        command = ["train", str(job)] if pod_env else ["run", str(job), "--nproc", str(nproc)]
        self.process = subprocess.Popen(
            [str(FINETUNE), *command],
            env=env,
            stdout=self.stdout,
            stderr=self.stderr,
        )
        self.workers: list[int] = []

    def output(self) -> str:
        return (self.folder / "stdout.txt").read_text() + (self.folder / "stderr.txt").read_text()

    def wait_for_training(self, output: Path, timeout: float = 900) -> None:
        """Until the first step is logged: the workers are up and training."""
        log = output / "train_log.jsonl"
        deadline = time.monotonic() + timeout
        while not (log.exists() and log.read_text().strip()):
            if self.process.poll() is not None:
                pytest.fail(f"exited {self.process.returncode} first:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no step logged in {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.5)
        self.workers = children_of().get(self.process.pid, [])

    def end(self) -> None:
        """Kill the launcher and every worker still there (a finalizer: also on failure)."""
        for pid in [self.process.pid, *self.workers, *children_of().get(self.process.pid, [])]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        self.stdout.close()
        self.stderr.close()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.end()


def test_second_run_refused_and_the_first_trains_as_if_alone(
    tmp_path: Path, tiny_model: Path, disc_images: Path, runs: list[Run]
) -> None:
    """A second job file (another seed) pointed at a busy output is refused, and the first
    run's weights are bit for bit those of the same job trained undisturbed."""
    spec: dict[str, Any] = {"training": {"maxSteps": 30}, "checkpointing": {"everyNSteps": 15}}
    (tmp_path / "alone").mkdir()
    finetune_run(job_file(tmp_path / "alone", tiny_model, disc_images, **spec))

    job = job_file(tmp_path, tiny_model, disc_images, **spec)
    output = tmp_path / "out"
    first = Run(job, nproc=2)
    runs.append(first)
    first.wait_for_training(output)
    # Held still while the second run tries (a stopped process keeps its lease): the
    # refusal cannot race the end of a short run.
    for pid in first.workers:
        os.kill(pid, signal.SIGSTOP)
    (plan,) = output.glob(".run/plan-*.json")
    planned = plan.read_text()

    (tmp_path / "other").mkdir()
    other = job_file(
        tmp_path / "other",
        tiny_model,
        disc_images,
        training={"maxSteps": 30, "seed": 7},
        output={"uri": str(output)},
    )
    second = finetune_run(other, nproc=1, expect=2)
    message = second.stderr.strip().splitlines()[-1]
    assert f"spec.output.uri: {output} is in use by another run" in message
    holder = json.loads((output / ".run" / "lease").read_text())
    assert f"(host {holder['host']}, pid {first.process.pid}, since {holder['since']})" in message
    # The first run's plan is its own: not replaced, not joined by another.
    assert list(output.glob(".run/plan-*.json")) == [plan]
    assert plan.read_text() == planned

    for pid in first.workers:
        os.kill(pid, signal.SIGCONT)
    assert first.process.wait(timeout=600) == 0, first.output()[-3000:]
    expected = load_file(tmp_path / "alone" / "out" / WEIGHTS)
    actual = load_file(output / WEIGHTS)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    assert len(train_log(output)) == 30  # one run's lines, none interleaved


def test_workers_die_with_a_killed_launcher(
    tmp_path: Path, tiny_model: Path, disc_images: Path, runs: list[Run]
) -> None:
    job = job_file(tmp_path, tiny_model, disc_images, **LONG)
    output = tmp_path / "out"
    first = Run(job, nproc=2)
    runs.append(first)
    first.wait_for_training(output)
    assert len(first.workers) == 2

    os.kill(first.process.pid, signal.SIGKILL)  # as the OOM killer does
    killed = time.monotonic()
    first.process.wait(timeout=30)
    while any(alive(pid) for pid in first.workers) and time.monotonic() - killed < 10:
        time.sleep(0.1)
    assert not [pid for pid in first.workers if alive(pid)], "workers outlived the launcher"
    seconds = time.monotonic() - killed
    assert seconds < 5, f"workers took {seconds:.1f} s to die"
    # Once the last thread of the last worker has exited (a killed process's main thread
    # shows as a zombie while the others still exit), the output is free again.
    deadline = time.monotonic() + 30
    while True:
        lease = LocalLease(output, str(output))
        try:
            lease.acquire()
            break
        except OutputBusy:
            assert time.monotonic() < deadline, "the lease outlived the first run's processes"
            time.sleep(0.1)
    lease.release()


def test_a_rank_the_kernel_kills_is_named_as_the_cause(
    tmp_path: Path,
    tiny_model: Path,
    disc_images: Path,
    runs: list[Run],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The OOM killer's SIGKILL to one rank makes the others fail too (a connection
    reset); the launcher reports the killed rank: exit 137 and its message, also where
    Kubernetes reads a pod's reason, over the message a surviving rank left first."""
    termination_log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(termination_log))
    job = job_file(tmp_path, tiny_model, disc_images, **LONG)
    run = Run(job, nproc=2)
    runs.append(run)
    run.wait_for_training(tmp_path / "out")
    assert len(run.workers) == 2

    os.kill(run.workers[-1], signal.SIGKILL)
    assert run.process.wait(timeout=120) == 128 + signal.SIGKILL
    message = "a training process on node 0 was killed by SIGKILL (out of memory?"
    assert f"error: {message}" in run.output()
    assert termination_log.read_text().startswith(message)


def test_sighup_checkpoints_and_exits_130(
    tmp_path: Path, tiny_model: Path, disc_images: Path, runs: list[Run]
) -> None:
    job = job_file(tmp_path, tiny_model, disc_images, **LONG)
    output = tmp_path / "out"
    run = Run(job, nproc=2)
    runs.append(run)
    run.wait_for_training(output)
    run.process.send_signal(signal.SIGHUP)  # the terminal was closed
    code = run.process.wait(timeout=300)
    assert code == 130, run.output()[-3000:]
    found = manifest.latest(output / "checkpoints")
    assert found is not None, "no verified checkpoint"
    assert f"Stopped at step {found.step}; checkpoint saved." in run.output()
    assert not [pid for pid in run.workers if alive(pid)]
    assert not list(output.glob(".run/plan-*.json"))  # a run cleans its plan up


def test_closing_the_terminal_checkpoints_and_exits_130(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    """The launcher on a real pseudo-terminal whose other end goes away, as when an SSH
    session drops: the kernel's SIGHUP stops the run with a checkpoint, and the writes to
    the dead terminal (progress bars) do not cut the stop short."""
    job = job_file(tmp_path, tiny_model, disc_images, **LONG)
    output = tmp_path / "out"
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    pid, terminal = pty.fork()  # the child's controlling terminal is the pty
    if pid == 0:
        os.execve(str(FINETUNE), [str(FINETUNE), "run", str(job), "--nproc", "2"], env)
    hang_up = threading.Event()
    shown: list[bytes] = []

    def read_terminal() -> None:  # a terminal that is not read blocks its writers
        while not hang_up.is_set():
            if select.select([terminal], [], [], 0.1)[0]:
                with suppress(OSError):
                    shown.append(os.read(terminal, 65536))
        os.close(terminal)  # the last close of the master: SIGHUP to the session

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    workers: list[int] = []
    try:
        log = output / "train_log.jsonl"
        deadline = time.monotonic() + 900
        while not (log.exists() and log.read_text().strip()):
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), b"".join(shown)[-3000:]
            assert time.monotonic() < deadline, b"".join(shown)[-3000:]
            time.sleep(0.5)
        workers = children_of().get(pid, [])
        hang_up.set()
        reader.join(timeout=10)
        deadline = time.monotonic() + 300
        while (ended := os.waitpid(pid, os.WNOHANG)) == (0, 0):
            assert time.monotonic() < deadline, "the run went on after its terminal closed"
            time.sleep(0.2)
        assert os.waitstatus_to_exitcode(ended[1]) == 130
        assert manifest.latest(output / "checkpoints") is not None, "no verified checkpoint"
        assert not [worker for worker in workers if alive(worker)]
    finally:
        hang_up.set()
        for process in [pid, *workers]:
            with suppress(ProcessLookupError):
                os.kill(process, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)


def stop_within(run: Run, seconds: float, signum: int = signal.SIGINT) -> int:
    """Ctrl-C (or `signum`) to the launcher; its exit code, which must come within `seconds`."""
    run.process.send_signal(signum)
    sent = time.monotonic()
    code = run.process.wait(timeout=300)
    took = time.monotonic() - sent
    name = signal.Signals(signum).name
    assert took < seconds, f"stopped {took:.1f} s after {name}:\n{run.output()[-3000:]}"
    return code


def wait_until(condition: Callable[[], bool], run: Run, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if run.process.poll() is not None:
            pytest.fail(f"exited {run.process.returncode} first:\n{run.output()[-3000:]}")
        assert time.monotonic() < deadline, run.output()[-3000:]
        time.sleep(0.2)


def test_ctrl_c_stops_class_image_generation_at_once(
    tmp_path: Path, tiny_model: Path, disc_images: Path, runs: list[Run]
) -> None:
    concept = {
        "instanceImages": str(disc_images),
        "instancePrompt": "a photo of sks disc",
        "classPrompt": "a photo of a disc",
        "classImages": {"count": 4000},  # minutes of generation: the stop must cut it
    }
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        data={"concepts": [concept]},
        training={"maxSteps": 4, "priorPreservation": True},
    )
    output = tmp_path / "out"
    classes = output / "class_images" / "concept-0"
    run = Run(job, nproc=2)
    runs.append(run)
    wait_until(lambda: classes.is_dir() and any(classes.glob("*.png")), run)
    assert stop_within(run, 10) == 130
    assert not list(classes.glob("*.partial")), "a half-written class image"
    assert not (output / "train_log.jsonl").exists()
    assert "Stopped on request." in run.output()


def test_ctrl_c_while_torch_loads_exits_130_without_a_traceback(
    tmp_path: Path, tiny_model: Path, disc_images: Path, runs: list[Run]
) -> None:
    """The first seconds of `finetune run` load torch; a Ctrl-C then is remembered and
    ends the start like any other stop before training, not with a KeyboardInterrupt."""
    run = Run(job_file(tmp_path, tiny_model, disc_images))
    runs.append(run)
    maps = Path(f"/proc/{run.process.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text():  # torch's library is in: its import runs
        assert run.process.poll() is None, run.output()
        assert time.monotonic() < deadline, run.output()
        time.sleep(0.005)
    assert stop_within(run, 30) == 130, run.output()
    assert "Traceback" not in run.output()
    assert "Stopped before training began; nothing was written." in run.output()
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_a_worker_loads_torch_says_nothing_was_written(
    tmp_path: Path, tiny_model: Path, disc_images: Path, runs: list[Run]
) -> None:
    run = Run(job_file(tmp_path, tiny_model, disc_images))
    runs.append(run)
    deadline = time.monotonic() + 60
    while not children_of().get(run.process.pid):  # the worker is there, importing torch
        assert run.process.poll() is None, run.output()
        assert time.monotonic() < deadline, run.output()
        time.sleep(0.005)
    assert stop_within(run, 30) == 130, run.output()
    assert "Stopped before training began; nothing was written." in run.output()
    assert "Traceback" not in run.output()
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_ctrl_c_stops_sample_generation_and_checkpoints(
    tmp_path: Path, tiny_model: Path, disc_images: Path, runs: list[Run]
) -> None:
    validation = {
        "prompts": ["a photo of sks disc"],
        "everyNSteps": 2,
        "imagesPerPrompt": 16,
        "inferenceSteps": 1000,  # minutes of sampling: the stop must cut it
    }
    job = job_file(tmp_path, tiny_model, disc_images, validation=validation, **LONG)
    output = tmp_path / "out"
    run = Run(job, nproc=2)
    runs.append(run)
    wait_until(lambda: (output / "samples" / "step-00000002").is_dir(), run)
    assert stop_within(run, 15) == 130
    # The interrupted samples are gone, not half there; the next step stopped every rank.
    assert not (output / "samples" / "step-00000002").exists()
    found = manifest.latest(output / "checkpoints")
    assert found is not None
    assert found.step == 3
    assert "samples left out, a stop was requested" in run.output()


def test_sigterm_ends_a_node_waiting_at_the_rendezvous(
    tmp_path: Path, tiny_model: Path, disc_images: Path, runs: list[Run]
) -> None:
    """Node 1 of a gang whose master takes its connection and never answers waits inside
    the rendezvous, in C, where no Python signal handler runs: the pod's SIGTERM must end
    it anyway, at once and with exit 130, not after the rendezvous timeout (hours)."""
    with socket.socket() as master:
        master.bind(("127.0.0.1", 0))
        master.listen()
        master.settimeout(1)
        gang = {
            "FINETUNE_NNODES": "2",
            "FINETUNE_NODE_RANK": "1",
            "FINETUNE_NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master.getsockname()[1]),
        }
        run = Run(job_file(tmp_path, tiny_model, disc_images), pod_env=gang)
        runs.append(run)
        peers: list[socket.socket] = []

        def connected() -> bool:  # the worker is in the rendezvous
            with suppress(TimeoutError):
                peers.append(master.accept()[0])
            return bool(peers)

        wait_until(connected, run)  # fails the test if the run ends first
        with peers[0]:
            assert stop_within(run, 15, signal.SIGTERM) == 130
    assert not children_of().get(run.process.pid)
