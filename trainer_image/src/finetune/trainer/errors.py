"""Errors a user can act on, and the process exit codes that tell them apart."""

from __future__ import annotations

# Exit codes of `finetune run` / `finetune train` (and of each training process).
# The operator reads them to classify a failure:
#   0   done
#   1   anything else (a bug, out of memory, a lost rank, S3 or the hub unreachable
#       after the retries): may be worth a retry
#   2   bad input (a missing folder, an unreadable image, not a model, an output that
#       is a file or cannot be written, `--nproc` out of range, an output another run
#       holds): permanent
#   3   the loss became NaN or infinite: the hyperparameters diverge; retrying
#       the same spec diverges again
#   4   S3 or the hub refused the credentials: permanent until the secret changes
#   5   no local disk space left to save a checkpoint or the results: permanent
#       for this volume; the previous checkpoint stays intact
#   130 stopped on request (SIGINT/SIGTERM/SIGHUP): with a checkpoint saved once
#       training began; before that, with nothing written
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID_INPUT = 2
EXIT_NON_FINITE_LOSS = 3
EXIT_ACCESS_DENIED = 4
EXIT_DISK_FULL = 5
EXIT_INTERRUPTED = 130


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
