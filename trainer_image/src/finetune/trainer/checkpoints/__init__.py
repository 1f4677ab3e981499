"""Checkpoints: their manifest, retention, and copies that outlive the machine."""
