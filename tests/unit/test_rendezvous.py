"""Where a pod's training processes meet: from the indexed Job's environment."""

from __future__ import annotations

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
