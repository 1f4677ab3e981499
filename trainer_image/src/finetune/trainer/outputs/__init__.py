"""What a run leaves behind: weights, samples, a model card, and the artifact list."""
