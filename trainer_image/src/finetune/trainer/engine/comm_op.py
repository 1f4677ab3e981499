"""DeepSpeed's JIT-built communication op, built where a killed build cannot block us.

DeepSpeed builds its shared-memory comm op on first use through torch's
`cpp_extension`, which guards the build with a bare `lock` file in the op's build
folder. A build killed part-way (OOM, Ctrl-C, SIGKILL) leaves that file behind, and
every later start waits on it forever. So:

- each install builds into a folder of its own (`$TORCH_EXTENSIONS_DIR`, by default
  `~/.cache/torch_extensions/finetune-<install>`): two installs no longer rebuild over
  each other's op, and no other program shares the folder;
- the op is loaded before DeepSpeed asks for it, under an `flock` every finetune
  process takes for the build. The kernel releases an flock when its holder dies, so
  holding it proves no live build is under way: a torch `lock` file found then was left
  by a dead builder and is removed with a warning;
- a process that has to wait for another's build says so.

`python -m finetune.trainer.engine.comm_op` builds the op once (`make setup` runs it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

from finetune.trainer.process import flock

log = logging.getLogger(__name__)
EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
BUILD_LOCK = ".finetune-build.lock"


def default_dir() -> Path:
    """This install's build folder: keyed by the interpreter's prefix (the venv)."""
    install = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "torch_extensions" / f"finetune-{install}"


def extensions_dir() -> Path:
    """The folder torch builds into, set in this process's environment."""
    root = Path(os.environ.get(EXTENSIONS_ENV) or default_dir())
    os.environ[EXTENSIONS_ENV] = str(root)
    return root


def clear_stale_locks(root: Path) -> list[Path]:
    """Remove torch's build locks under `root`; call only while holding the build flock."""
    stale = sorted(root.glob("*/lock"))
    for lock in stale:
        log.warning("removing a build lock left by a killed build: %s", lock)
        print(f"warning: removing a build lock left by a killed build: {lock}", file=sys.stderr)
        lock.unlink(missing_ok=True)
    return stale


def build_comm_op() -> None:
    """Load (building once) DeepSpeed's comm op under the build flock."""
    root = extensions_dir()

    def announce() -> None:
        print(
            f"waiting for another process to finish building DeepSpeed's ops in {root}",
            file=sys.stderr,
            flush=True,
        )

    with flock.held(root / BUILD_LOCK, announce):
        clear_stale_locks(root)
        _load()


def _load() -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return  # the op serves gloo's collectives on CPUs; GPUs talk over NCCL
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    builder.load(verbose=False)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    build_comm_op()
    print(f"DeepSpeed's comm op is built in {extensions_dir()}")
