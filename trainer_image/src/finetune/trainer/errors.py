"""Errors a user can act on, and the exit code each ends a process with (the codes
themselves are the pod contract's, `finetune.api.pod`)."""

from __future__ import annotations

from finetune.api.pod import (
    EXIT_ACCESS_DENIED,
    EXIT_DISK_FULL,
    EXIT_FAILED,
    EXIT_INVALID_INPUT,
    EXIT_NON_FINITE_LOSS,
)


class JobInputError(Exception):
    """Bad input: a missing folder, an unreadable image, a model that is not one.

    The message names the path or URI; retrying cannot help.
    """


class AccessDenied(JobInputError):  # noqa: N818 - named like the failure reason it stands for
    """S3 or the hub refused the job's credentials (missing, wrong, expired, or
    without access to what the job names). A `JobInputError`, so code that catches
    bad input catches this too; only the exit code differs."""


class DiskFull(JobInputError):  # noqa: N818 - named like the failure reason it stands for
    """The local disk (or a file-size limit) left no room to save a checkpoint or the
    results. Permanent for this pod's disk: the same job on the same volume fills it again."""


class Unreachable(Exception):  # noqa: N818 - named like what happened
    """S3 or the hub could not be reached within the retry budget: exit 1, retryable."""


class NonFiniteLoss(Exception):  # noqa: N818 - named like the failure reason it stands for
    """The (rank-averaged) training loss became NaN or infinite."""


def exit_code_for(error: BaseException) -> int:
    """The exit code a process ends with after `error`."""
    if isinstance(error, AccessDenied):
        return EXIT_ACCESS_DENIED
    if isinstance(error, DiskFull):
        return EXIT_DISK_FULL
    if isinstance(error, JobInputError):
        return EXIT_INVALID_INPUT
    if isinstance(error, NonFiniteLoss):
        return EXIT_NON_FINITE_LOSS
    return EXIT_FAILED
