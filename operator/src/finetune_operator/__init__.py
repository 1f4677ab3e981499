"""The FineTuneJob operator (kopf): turns FineTuneJobs into training pods.

It reads jobs through `finetune.api`, which needs no torch, so the operator
image stays small.
"""
