"""One training process: its DeepSpeed engine, the step loop, and the worker entry point."""
