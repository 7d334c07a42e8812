class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or unreadable; the message says which file and why."""
