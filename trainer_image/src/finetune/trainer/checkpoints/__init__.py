"""A run's checkpoints, one path for every output (`run_checkpoints`): what they hold
(`state`, `rng`), their manifest, the copy in a remote output's store (`replica`),
the layout a resuming run must share, and a full disk told clearly (`space`)."""
