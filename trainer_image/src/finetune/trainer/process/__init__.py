"""The processes of a run: who is who in the gang, clean stops, and dying with the launcher."""
