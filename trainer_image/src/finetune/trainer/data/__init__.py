"""Training data: concept images and caption datasets, decoded, encoded and batched."""
