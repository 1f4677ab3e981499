"""A FineTuneJob's groups on the Pushgateway, deleted when the job goes and before a
new job of its name trains.

The trainer pushes its final values under the grouping key
job/<name>/namespace/<ns>/rank/<rank>; the Pushgateway keeps a group until someone
deletes it. Left there, a finished job stays in the dashboard for good, and a job
created again under the same name shows the old run's values beside its own.
"""

from __future__ import annotations

import http.client
import logging

from prometheus_client import delete_from_gateway

log = logging.getLogger(__name__)

# The ranks whose processes push: global rank 0 alone (it writes the results,
# `finetune.trainer.outputs.finish`), whatever the gang's size.
PUSHING_RANKS = (0,)
# A gateway that does not answer must not hold up a job's deletion for long.
TIMEOUT_SECONDS = 3.0


def delete_groups(url: str, namespace: str, name: str) -> list[int]:
    """Delete the job's groups (deleting one that does not exist succeeds); the ranks
    whose group could not be deleted, each with a warning. Nothing without a URL."""
    if not url:
        return []
    failed = []
    for rank in PUSHING_RANKS:
        try:
            delete_from_gateway(
                url,
                job=name,
                grouping_key={"namespace": namespace, "rank": str(rank)},
                timeout=TIMEOUT_SECONDS,
            )
        except (OSError, http.client.HTTPException) as exc:
            failed.append(rank)
            log.warning(
                "metrics: could not delete FineTuneJob %s/%s's group (rank %d) from the "
                "Pushgateway at %s (%s); the dashboard shows its last values until it is "
                "deleted (DELETE %s/metrics/job/%s/namespace/%s/rank/%d)",
                namespace,
                name,
                rank,
                url,
                exc,
                url.rstrip("/"),
                name,
                namespace,
                rank,
            )
    return failed
