"""What a run tells people: Prometheus metrics and the FineTuneJob status."""
