"""One training process: `python -m finetune.trainer.engine.worker PLAN.json`.

Started by the launcher with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set; exits with the codes in `finetune.trainer.errors`, and leaves a
failure's cause in the termination log (`finetune.trainer.telemetry.status`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from finetune.api.pod import EXIT_FAILED, EXIT_INTERRUPTED, LOG_LEVEL_ENV
from finetune.trainer.errors import exit_code_for
from finetune.trainer.process.stopping import STOPPED_BEFORE_TRAINING, Stopped, StopRequest
from finetune.trainer.process.tether import tie_to_launcher

LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level(value: str | None) -> tuple[int, str | None]:
    """The trainer's log level from `$FINETUNE_LOG_LEVEL`: info when unset, and info with
    a warning to log when it names no level (a typo must not stop a run)."""
    if not value:
        return logging.INFO, None
    if value.strip().lower() in LOG_LEVELS:
        return logging.getLevelName(value.strip().upper()), None
    choices = ", ".join(LOG_LEVELS)
    return logging.INFO, f"{LOG_LEVEL_ENV}={value!r} is not a log level ({choices}); using info"


def main(argv: list[str]) -> int:
    stop = StopRequest()  # first: a signal while torch loads must not kill us
    tie_to_launcher()  # and die with the launcher, whatever kills it
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    level, unknown = log_level(os.environ.get(LOG_LEVEL_ENV))
    logging.getLogger("finetune").setLevel(level)
    if unknown:
        logging.getLogger("finetune").warning(unknown)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from finetune.trainer.engine.plan import RunPlan
    from finetune.trainer.engine.trainer import Trainer
    from finetune.trainer.process.distributed import Rank
    from finetune.trainer.telemetry.termination import write_termination_message

    rank = Rank.from_env()
    plan = RunPlan.from_json(Path(argv[0]).read_text())
    try:
        if stop.requested:  # asked while torch loaded: nothing to save yet
            if rank.main:
                print(STOPPED_BEFORE_TRAINING, file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        return Trainer(plan, rank, stop).run()
    except Stopped:
        if rank.main:
            print("Stopped on request.", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code_for(exc)
        if code == EXIT_FAILED and stop.repeated:
            # Stopped twice, the peers left what they waited for, as asked, and this rank,
            # waiting for them in a collective, lost them: the stop, not a failure.
            logging.getLogger("finetune").info(
                "rank %d: its peers left after a second stop (%s)", rank.rank, type(exc).__name__
            )
            return EXIT_INTERRUPTED
        if code == EXIT_FAILED:  # unexpected: the traceback is worth having
            logging.getLogger("finetune").exception("rank %d failed", rank.rank)
            message = f"rank {rank.rank} failed: {type(exc).__name__}: {exc}"
        else:  # the message says what to do
            print(f"error: {exc}", file=sys.stderr, flush=True)
            message = str(exc)
        write_termination_message(message)
        return code


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: process-group and thread shutdown can hang there.
    os._exit(code)
