"""Starting a run: checks before any worker starts, the output lease, and the workers."""
