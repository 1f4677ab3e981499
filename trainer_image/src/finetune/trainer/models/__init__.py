"""The base model: where it comes from and its loaded components."""
