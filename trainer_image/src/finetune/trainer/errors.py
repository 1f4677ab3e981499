"""Errors a user can act on, and the process exit codes that tell them apart."""

from __future__ import annotations

# Exit codes of `finetune run` / `finetune train`. The operator reads them to
# classify a failure: bad input is permanent and never retried.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID_INPUT = 2
EXIT_INTERRUPTED = 130


class JobInputError(Exception):
    """Bad input: a missing folder, an unreadable image, a model that is not one.

    The message names the path or URI; retrying cannot help.
    """
