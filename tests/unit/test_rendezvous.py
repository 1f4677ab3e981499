"""Where a pod's training processes meet: from the indexed Job's environment."""

from __future__ import annotations

import pytest

from finetune.trainer.errors import JobInputError
from finetune.trainer.launcher.run import Rendezvous


def test_rendezvous_in_a_pod_comes_from_the_indexed_job() -> None:
    env = {
        "FINETUNE_NNODES": "4",
        "JOB_COMPLETION_INDEX": "2",
        "FINETUNE_NPROC_PER_NODE": "8",
        "MASTER_ADDR": "job-0.job-workers",
        "MASTER_PORT": "29500",
    }
    rendezvous = Rendezvous.from_env(env)
    assert (rendezvous.nnodes, rendezvous.node_rank, rendezvous.world) == (4, 2, 32)
    assert rendezvous.master_addr == "job-0.job-workers"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FINETUNE_NNODES": "abc"}, "$FINETUNE_NNODES: 'abc' must be an integer from 1 to"),
        (
            {"FINETUNE_NNODES": "2", "FINETUNE_NODE_RANK": "5"},
            "$FINETUNE_NODE_RANK: '5' must be an integer from 0 to 1",
        ),
        (
            {"JOB_COMPLETION_INDEX": "1"},
            "$JOB_COMPLETION_INDEX: '1' must be an integer from 0 to 0",
        ),
        (
            {"FINETUNE_NPROC_PER_NODE": "0"},
            "$FINETUNE_NPROC_PER_NODE: '0' must be an integer from 1",
        ),
        ({"MASTER_PORT": "99999"}, "$MASTER_PORT: '99999' must be an integer from 1 to 65535"),
    ],
)
def test_a_rendezvous_that_cannot_work_is_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(JobInputError) as refused:
        Rendezvous.from_env(env)
    assert str(refused.value).startswith(message)
