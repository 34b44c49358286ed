"""The error every checkpoint reader raises, in a module without torch so that the NumPy forward can raise it too."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or of the wrong kind; the message says what to do."""
