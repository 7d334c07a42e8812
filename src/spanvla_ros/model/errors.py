class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or unreadable; the message says which file and why."""


class ReasoningCancelled(RuntimeError):
    """A reasoner run stopped between decode steps because its caller asked (a node shutting down must not
    leave a thread inside torch when the interpreter exits)."""
