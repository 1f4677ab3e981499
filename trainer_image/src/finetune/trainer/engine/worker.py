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
from finetune.trainer.process.stopping import Stopped, StopRequest
from finetune.trainer.process.tether import tie_to_launcher


def main(argv: list[str]) -> int:
    stop = StopRequest()  # first: a signal while torch loads must not kill us
    tie_to_launcher()  # and die with the launcher, whatever kills it
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("finetune").setLevel(os.environ.get(LOG_LEVEL_ENV, "INFO").upper())
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
        if stop.requested:
            return EXIT_INTERRUPTED  # asked to stop before training began: nothing to save
        return Trainer(plan, rank, stop).run()
    except Stopped:
        if rank.main:
            print("Stopped on request.", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code_for(exc)
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
