"""The trainer: DeepSpeed training of the FineTuneJob methods, shared loop, plugins.

Everything here imports torch; `finetune.api` and `finetune.cli` do not.
"""
