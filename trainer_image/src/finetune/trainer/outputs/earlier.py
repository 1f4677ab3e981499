"""Results an earlier run in the same output left that this run does not make.

A run's end replaces the results it writes; what it does not write (the kohya file of a
run that asked for it, a pipeline where this run saves a LoRA, a token file of a token
since renamed) would stay beside the new results, be listed in `status.artifacts` and be
uploaded with them as if this run had made it. Those are removed: from the local folder
before the new results move in, and from an S3 output once the new ones are up.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from finetune.api.status import ArtifactKind
from finetune.trainer.methods.custom_diffusion import WEIGHTS_FILE as CUSTOM_DIFFUSION_FILE
from finetune.trainer.outputs.artifacts import PIPELINE_INDEX, kind_of, parts_named, pipeline_parts
from finetune.trainer.storage.store import Store

log = logging.getLogger(__name__)

# What a run's end writes (the model card, always written, and samples, made as the run
# goes, are not among them).
RESULT_KINDS = frozenset(
    {
        ArtifactKind.LORA,
        ArtifactKind.KOHYA_LORA,
        ArtifactKind.CUSTOM_DIFFUSION,
        ArtifactKind.EMBEDDING,
        ArtifactKind.PIPELINE,
    }
)


def earlier_results(names: Iterable[str], parts: set[str], made: set[str]) -> list[str]:
    """Of the names at the top of an output, those holding an earlier run's results that
    this run does not make (`made`): weights, a pipeline and its part folders (`parts`,
    by the earlier `model_index.json`), and Custom Diffusion token files, taken for such
    only beside an earlier run's Custom Diffusion weights (any `.safetensors` may be)."""
    present = set(names)
    stale = []
    for name in sorted(present - made):
        kind = kind_of(PurePosixPath(name), parts)
        if kind == ArtifactKind.EMBEDDING and CUSTOM_DIFFUSION_FILE not in present:
            kind = None
        if name in parts or kind in RESULT_KINDS:
            stale.append(name)
    return stale


def remove_from_folder(work_dir: Path, made: set[str]) -> None:
    """Remove from `work_dir` the earlier results this run's (`made`) do not replace."""
    names = [entry.name for entry in work_dir.iterdir()]
    for name in earlier_results(names, pipeline_parts(work_dir), made):
        path = work_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        log.info("%s: removed, an earlier run's result that this run does not make", path)


def stale_in_store(store: Store, made: set[str]) -> list[str]:
    """The keys of `store` holding earlier results this run's (`made`) do not replace:
    read before this run's results go up (its `model_index.json` replaces the earlier)."""
    try:
        parts = parts_named(json.loads(store.read_text(PIPELINE_INDEX) or "{}"))
    except ValueError:
        parts = set()
    stale = earlier_results(store.top_level(), parts, made)
    return [
        key
        for name in stale
        for key, _ in store.keys(name)
        if key == name or key.startswith(name + "/")
    ]


def remove_from_store(store: Store, keys: list[str]) -> None:
    if keys:
        store.delete(keys)
        log.info("%s: %d object(s) of an earlier run's results removed", store.uri, len(keys))
