"""Checkpoint retention: which checkpoints of a run to keep, which to delete, and why."""
