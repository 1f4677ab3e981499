"""Start a job's training processes: on this machine, or as one node of a pod gang.

`finetune run` (a laptop, a workstation, CI) and the trainer image's entrypoint
(`finetune train` in a pod) both come here; only where the rendezvous comes
from differs. Inputs are resolved once, before any worker starts, so a bad
path fails in seconds rather than after every rank has loaded a model. Before any
input is fetched the output is checked (a folder that takes a write, an S3 prefix that
takes a probe) and leased, so a second run into it is refused (`lease`). A stop request
during all this ends the start at once with exit 130 (`stopping`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from finetune.api import pod
from finetune.api.common import is_s3
from finetune.api.methods import Method
from finetune.api.pod import EXIT_FAILED, EXIT_INTERRUPTED
from finetune.api.training import TrainingSpec
from finetune.trainer.data import class_homes
from finetune.trainer.data.captions import check_dataset
from finetune.trainer.data.concepts import (
    Example,
    examples_from,
    split_held_out,
    unread_images,
)
from finetune.trainer.data.images import ImageRules
from finetune.trainer.engine.deepspeed_setup import check_optimizer
from finetune.trainer.engine.plan import RunPlan
from finetune.trainer.errors import JobInputError, Unreachable, exit_code_for
from finetune.trainer.evaluation.references import modifier_tokens_in
from finetune.trainer.evaluation.sources import resolve_evaluators
from finetune.trainer.families import check_same_family, resolve_family
from finetune.trainer.launcher.lease import RUN_FOLDER, OutputClaim
from finetune.trainer.launcher.overlap import check_class_images_apart, check_output_apart
from finetune.trainer.launcher.preflight import (
    check_output,
    check_s3_writable,
    checked_nproc,
    make_folder,
)
from finetune.trainer.models.fingerprint import fingerprint
from finetune.trainer.models.sources import VAE_FIELD, resolve_model, resolve_vae
from finetune.trainer.process import stopping
from finetune.trainer.process.stopping import (
    STOP_SIGNALS,
    STOPPED_BEFORE_TRAINING,
    Stopped,
    StopRequest,
)
from finetune.trainer.process.tether import LAUNCHER_PID_ENV, SENDING_MARKER_ENV
from finetune.trainer.storage.files import cache_key
from finetune.trainer.storage.inputs import local_folder, said_as
from finetune.trainer.storage.retries import RETRY_FOR_ENV, retry_budget
from finetune.trainer.storage.s3 import S3Settings, transient
from finetune.trainer.telemetry.termination import write_termination_message

# How long the other workers have to end once one has ended in failure or stopped.
STOP_GRACE = 30.0
LEAVE_GRACE = 5.0
# The stop after this many kills the workers: the first asks for a checkpointed stop, the
# second leaves uploads; a process caught in a collective hears neither.
KILL_AFTER_STOPS = 2


@dataclass(frozen=True)
class Rendezvous:
    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = pod.RENDEZVOUS_PORT

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Rendezvous:
        """In a pod: the operator sets these; the node rank is the Indexed Job's index.
        A value set by hand that cannot work is refused naming its variable: a node rank
        past the gang would otherwise wait hours for peers that never come."""
        env = dict(os.environ if env is None else env)

        def number(name: str, default: int, low: int, high: int) -> int:
            raw = env.get(name, str(default))
            try:
                value = int(raw)
            except ValueError:
                value = low - 1
            if not low <= value <= high:
                raise JobInputError(f"${name}: {raw!r} must be an integer from {low} to {high}")
            return value

        nnodes = number(pod.NNODES_ENV, 1, 1, 65536)
        rank_name = pod.NODE_RANK_ENV if pod.NODE_RANK_ENV in env else pod.COMPLETION_INDEX_ENV
        return cls(
            nnodes=nnodes,
            node_rank=number(rank_name, 0, 0, nnodes - 1),
            nproc_per_node=number(pod.NPROC_PER_NODE_ENV, 1, 1, 1024),
            master_addr=env.get(pod.MASTER_ADDR_ENV, cls.master_addr),
            master_port=number(pod.MASTER_PORT_ENV, cls.master_port, 1, 65535),
        )

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc_per_node


def cache_dir() -> Path:
    return Path(os.environ.get(pod.CACHE_DIR_ENV, Path.home() / ".cache" / "finetune"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prepare(
    spec: TrainingSpec,
    name: str,
    output_uri: str | None = None,
    claim: Callable[[str, Path, S3Settings], None] | None = None,
) -> RunPlan:
    """Check the output and `claim` it (take its lease), then resolve every input to a
    local path (downloading once) and check it can be used."""
    output = output_uri or spec.output.uri
    if output != spec.output.uri:
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"uri": output})})
    check_optimizer(spec)
    check_output_apart(spec, output)
    check_class_images_apart(spec)
    cache = cache_dir()
    s3 = S3Settings.of(spec.output)
    if is_s3(output):
        work_dir = cache / "runs" / cache_key(output)
    else:
        work_dir = Path(output).expanduser().resolve()
    check_output(output, work_dir, s3)
    if claim is not None:
        claim(output, work_dir, s3)
    model = resolve_model(spec.base_model.uri, cache, s3)
    family = resolve_family(str(spec.base_model.family), model, spec.base_model.uri)
    vae = resolve_vae(spec.base_model.vae_uri, cache, s3) if spec.base_model.vae_uri else None
    teacher = None
    if spec.lcm is not None and spec.lcm.teacher_model is not None:
        uri = spec.lcm.teacher_model.uri
        teacher = resolve_model(uri, cache, s3, pod.TEACHER_HF_TOKEN_ENV).resolve()
        check_same_family(family, teacher, uri, "spec.lcm.teacherModel.uri")
    # Once here, not in every worker: a checkpoint records them (`checkpoints.layout`).
    models = {"spec.baseModel.uri": model, VAE_FIELD: vae, "spec.lcm.teacherModel.uri": teacher}
    fingerprints = {f: fingerprint(folder) for f, folder in models.items() if folder is not None}
    if spec.data.dataset is not None:
        dataset = spec.data.dataset
        if not is_s3(dataset.uri):  # workers may start elsewhere: hand them an absolute path
            local = str(Path(dataset.uri).expanduser().resolve())
            dataset = dataset.model_copy(update={"uri": local})
            spec = spec.model_copy(
                update={"data": spec.data.model_copy(update={"dataset": dataset})}
            )
        layout = check_dataset(dataset, s3)
        print(f"Dataset {dataset.uri}: {layout.size}", flush=True)
    concepts: list[Path] = []
    classes: list[class_homes.ClassHome] = []
    for index, concept in enumerate(spec.data.concepts):
        folder = local_folder(concept.instance_images, cache, s3, "data")
        with said_as(folder, concept.instance_images):
            examples = examples_from(
                folder,
                concept.instance_prompt,
                concept.caption_files,
                f"spec.data.concepts[{index}].instanceImages",
                rules=ImageRules.of(spec.data),
            )
            check_caption_tokens(spec, index, split_held_out(examples, concept.hold_out)[0])
        unread = unread_images(folder)
        if unread:  # some are read: the run goes on, but says what it leaves out
            print(f"warning: spec.data.concepts[{index}].instanceImages: {unread}", file=sys.stderr)
        if concept.hold_out >= len(examples):
            raise JobInputError(
                f"spec.data.concepts[{index}].holdOut: {concept.hold_out} must be fewer than "
                f"the concept's {len(examples)} images ({concept.instance_images}), "
                "or nothing is left to train on"
            )
        concepts.append(folder.resolve())
        home = class_homes.class_home(spec, index, output, work_dir, cache)
        if concept.class_images.uri:  # missing class images are generated into it
            make_folder(home.folder, home.field)
        if spec.training.prior_preservation and home.uri is not None:
            fetched = class_homes.fetch(home, s3)
            if fetched:
                print(f"Class images {home.uri}: {fetched} fetched", flush=True)
            if len(class_homes.images_in(home.folder)) < concept.class_images.count:
                # The missing ones go up there: a read-only prefix fails now, not midway.
                check_s3_writable(home.uri, s3, home.field, f".probe-{uuid.uuid4().hex}")
        classes.append(home)
    clip, dino = resolve_evaluators(spec, cache, s3)
    return RunPlan(
        name,
        spec,
        work_dir,
        model.resolve(),
        concepts,
        [c.folder.resolve() for c in classes],
        output,
        family=family.name,
        teacher_folder=teacher,
        vae_folder=vae,
        clip_folder=clip,
        dino_folder=dino,
        model_fingerprints=fingerprints,
        class_uris=[c.uri for c in classes],
    )


def check_caption_tokens(spec: TrainingSpec, index: int, examples: list[Example]) -> None:
    """customDiffusion learns a modifier token only from prompts that hold it: caption
    files of a concept's training images (`examples`, held-out ones aside) that leave out
    its instance prompt's tokens are refused, naming the first."""
    cd = spec.custom_diffusion
    if spec.method != Method.CUSTOM_DIFFUSION or cd is None:
        return
    tokens = tuple(cd.modifier_tokens)
    wanted = modifier_tokens_in(spec.data.concepts[index].instance_prompt, tokens)
    lacking = [e for e in examples if not wanted & modifier_tokens_in(e.prompt, tokens)]
    if lacking:
        raise JobInputError(
            f"spec.data.concepts[{index}].instanceImages: {len(lacking)} caption file(s) hold "
            f"none of the concept's modifier tokens ({', '.join(sorted(wanted))}), first "
            f"{lacking[0].caption}; customDiffusion learns a token only from "
            "prompts that hold it: add it to the captions, or set captionFiles: false"
        )


def gpu_count() -> int:
    import torch

    return int(torch.cuda.device_count())


class Workers:
    """The processes of this node. Any one failing stops them all: DeepSpeed ranks
    cannot rejoin a running gang, so the whole gang restarts instead."""

    def __init__(
        self,
        plan_file: Path,
        rendezvous: Rendezvous,
        keep_fds: tuple[int, ...] = (),
        lease_lost: Callable[[], bool] = lambda: False,
    ) -> None:
        self.plan_file = plan_file
        self.rendezvous = rendezvous
        self.keep_fds = keep_fds
        self.lease_lost = lease_lost
        self.processes: list[subprocess.Popen[bytes]] = []
        self.interrupted = False
        self.stops = 0  # signals passed on: a second one leaves uploads (`upload_waits`)
        self.last_stop = signal.SIGINT

    def _env(self, local_rank: int) -> dict[str, str]:
        r = self.rendezvous
        env = dict(os.environ)
        env.update(
            RANK=str(r.node_rank * r.nproc_per_node + local_rank),
            LOCAL_RANK=str(local_rank),
            WORLD_SIZE=str(r.world),
            LOCAL_WORLD_SIZE=str(r.nproc_per_node),
            MASTER_ADDR=r.master_addr,
            MASTER_PORT=str(r.master_port),
        )
        env[LAUNCHER_PID_ENV] = str(os.getpid())  # workers die with us (`tether`)
        env[SENDING_MARKER_ENV] = str(self.sending_marker)  # rank 0 alone takes it
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // r.nproc_per_node))
        return env

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        """Ctrl-C, a pod's SIGTERM or a closed terminal's SIGHUP: ask every worker for a
        clean, checkpointed stop."""
        self.interrupted = True
        self.stops += 1
        self.last_stop = signal.Signals(signum)
        if signum == signal.SIGHUP:
            stopping.leave_terminal()
        alive = [process for process in self.processes if process.poll() is None]
        if self.stops > KILL_AFTER_STOPS:
            # A process caught in a collective (NCCL, gloo) runs no Python handler, so
            # no number of stops would reach it: the user asked often enough.
            os.write(2, f"Stopped {self.stops} times: killing {len(alive)} process(es)\n".encode())
            for process in alive:
                process.kill()
            return
        if self.stops == KILL_AFTER_STOPS and alive:
            os.write(2, b"Once more kills the training processes at once\n")
        for process in alive:
            process.send_signal(signum)  # SIGHUP too: they share our terminal

    def _pause(self, signum: int, frame: FrameType | None) -> None:
        """Ctrl-Z: the workers, in a session of their own, are out of the terminal's reach
        (and SIGTSTP does not stop such a process): they stop with the launcher, and go
        on when it is continued (`fg`, `bg`)."""
        alive = [process for process in self.processes if process.poll() is None]
        for process in alive:
            process.send_signal(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once continued
        for process in alive:
            process.send_signal(signal.SIGCONT)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in STOP_SIGNALS}
        previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._pause)
        try:
            for local_rank in range(self.rendezvous.nproc_per_node):
                command = [
                    sys.executable,
                    "-m",
                    "finetune.trainer.engine.worker",
                    str(self.plan_file),
                ]
                # A session of their own: the terminal's Ctrl-C reaches only us, and
                # we pass it on exactly once. They keep the output's lease fd open, so
                # the output stays locked until the last of them is gone.
                with stopping.held_for_children():  # a stop forwarded now waits for them
                    process = subprocess.Popen(
                        command,
                        env=self._env(local_rank),
                        start_new_session=True,
                        pass_fds=self.keep_fds,
                    )
                    self.processes.append(process)
                if self.stops:
                    # The signal is held on this thread only: another (torch's) may take it,
                    # and `_forward` then runs in the middle of Popen, before the process is
                    # in the list. It starts with the signals held, so a second one sent now
                    # is the same pending stop, not a repeated one.
                    process.send_signal(self.last_stop)
            stop = stopping.current()
            if stop is not None and stop.requested:  # asked just before our handler was in
                self._forward(signal.SIGINT, None)
            return self._wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _wait(self) -> int:
        while True:
            if self.lease_lost():
                return self._leave_a_taken_output()
            codes = [p.poll() for p in self.processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed and self._uploading_after_a_stop(codes):
                time.sleep(0.2)
                continue
            if failed:
                # After a second stop nothing is left to save: a rank still caught in a
                # collective with one that left goes soon.
                self._stop_all(LEAVE_GRACE if self.stops > 1 else STOP_GRACE)
                stopped = {EXIT_INTERRUPTED} | {-s for s in STOP_SIGNALS}
                if self.stops > KILL_AFTER_STOPS:  # killed as the user asked
                    stopped.add(-signal.SIGKILL)
                if self.interrupted and stopped & set(failed):
                    return EXIT_INTERRUPTED
                # A rank killed by a signal (the OOM killer's SIGKILL) is the cause; the
                # others' errors (a peer's connection reset) are its effects.
                code = min(failed) if min(failed) < 0 else failed[0]
                return code if code > 0 else 128 - code  # killed by a signal: 128 + its number
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)

    def _leave_a_taken_output(self) -> int:
        """Another run took the output's lease over (this run's heartbeats did not reach
        S3 for longer than the lease lives): the workers are killed before they write
        another checkpoint or result over that run's."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
        message = (
            "spec.output.uri: another run took the output's lease over while this run's "
            "heartbeats could not reach S3; this run stopped without saving, so as not to "
            "write over that run's checkpoints and results"
        )
        print(f"error: {message}", file=sys.stderr, flush=True)
        write_termination_message(message)
        return EXIT_FAILED

    @property
    def sending_marker(self) -> Path:
        return self.plan_file.with_name(f"{self.plan_file.stem}-sending")

    def _uploading_after_a_stop(self, codes: list[int | None]) -> bool:
        """After one stop, the ranks leave as their checkpoint files are up, rank 0 last,
        once it has sent the manifest (it holds its marker meanwhile): their exits (130)
        are no failure to end it for. Without the marker rank 0 is elsewhere (caught in
        a collective the others left, say), and the usual grace applies."""
        if not self.interrupted or self.stops != 1 or self.rendezvous.node_rank != 0:
            return False
        main, others = codes[0], codes[1:]
        return (
            main is None
            and all(code == EXIT_INTERRUPTED for code in others if code is not None)
            and self.sending_marker.exists()
        )

    def _stop_all(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def new_plan_file(work_dir: Path, node_rank: int) -> Path:
    """A name of its own, so no run reads (or overwrites) another run's plan. The plans an
    earlier launcher of this node left behind (killed by SIGKILL, which skips `finally`)
    are removed: with the output leased, none of them has a reader any more."""
    folder = work_dir / RUN_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"plan-*-node{node_rank}.json"):
        stale.unlink(missing_ok=True)
    return folder / f"plan-{uuid.uuid4().hex[:12]}-node{node_rank}.json"


def launch(
    plan: RunPlan,
    rendezvous: Rendezvous,
    keep_fds: tuple[int, ...] = (),
    lease_lost: Callable[[], bool] = lambda: False,
) -> int:
    plan_file = new_plan_file(plan.work_dir, rendezvous.node_rank)
    plan_file.write_text(plan.to_json())
    workers = Workers(plan_file, rendezvous, keep_fds, lease_lost)
    try:
        code = workers.run()
    finally:
        plan_file.unlink(missing_ok=True)
        workers.sending_marker.unlink(missing_ok=True)  # a rank 0 killed while sending
    if lease_lost():
        return code  # said already
    if code not in (0, EXIT_INTERRUPTED):
        message = f"a training process on node {rendezvous.node_rank} {_ended(code)}"
        killed = code > 128
        if killed:  # it could say nothing itself, and the other ranks' errors follow from it
            print(f"error: {message}", file=sys.stderr, flush=True)
        write_termination_message(message, replace=killed)
    return code


def _ended(code: int) -> str:
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            return f"exited with code {code}"
        hint = " (out of memory? the kernel's OOM killer sends it)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def run_local(
    spec: TrainingSpec,
    name: str,
    nproc: int | None,
    output_uri: str | None,
    stop: StopRequest | None = None,
) -> int:
    """`finetune run`: the whole job on this machine."""
    return _start(spec, name, output_uri, in_pod=False, nproc=nproc, stop=stop)


def run_in_pod(spec: TrainingSpec, name: str, stop: StopRequest | None = None) -> int:
    """`finetune train`: this pod's share of a gang, rendezvous from the environment."""
    return _start(spec, name, None, in_pod=True, stop=stop)


def _start(
    spec: TrainingSpec,
    name: str,
    output_uri: str | None,
    in_pod: bool,
    nproc: int | None = None,
    stop: StopRequest | None = None,
) -> int:
    # Ctrl-C, SIGTERM or SIGHUP from here on (or since the command began, when it made
    # `stop`) end the start at once.
    stop = stop or StopRequest()
    claim = OutputClaim(wait_for_own_job=in_pod)
    try:
        try:
            if in_pod:
                rendezvous = Rendezvous.from_env()
            else:
                nproc = checked_nproc(nproc, gpu_count())
                rendezvous = Rendezvous(nproc_per_node=nproc, master_port=free_port())
            # Node 0 alone leases: every node of a gang writes into the one output.
            with stop.interruptible():
                plan = prepare(spec, name, output_uri, claim if rendezvous.node_rank == 0 else None)
        except Stopped:
            print(STOPPED_BEFORE_TRAINING, file=sys.stderr)
            return EXIT_INTERRUPTED
        except (JobInputError, Unreachable) as exc:
            return _refused(str(exc), exit_code_for(exc), in_pod)
        except Exception as exc:
            if transient(exc):  # S3 out of reach past the retries: a later try may work
                return _refused(
                    f"S3 cannot be reached after retrying for {retry_budget():.0f} s "
                    f"(${RETRY_FOR_ENV}): {exc}",
                    EXIT_FAILED,
                    in_pod,
                )
            if in_pod:  # a bug: still say why
                write_termination_message(
                    f"preparing the inputs failed: {type(exc).__name__}: {exc}"
                )
            raise
        if stop.requested:
            print(STOPPED_BEFORE_TRAINING, file=sys.stderr)
            return EXIT_INTERRUPTED
        return launch(plan, rendezvous, claim.fds(), claim.lost)
    finally:
        claim.release()
        stop.close()


def _refused(message: str, code: int, in_pod: bool) -> int:
    print(f"error: {message}", file=sys.stderr)
    if in_pod:
        write_termination_message(message)
    return code
