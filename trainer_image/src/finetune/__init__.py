"""The FineTuneJob trainer: API types, the `finetune` CLI and the training code.

`finetune.api` and `finetune.cli` import pydantic and PyYAML only, so the
operator image can use them without torch; the training modules import torch
lazily, when a job actually trains.
"""

__version__ = "0.1.0"
