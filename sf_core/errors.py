"""Exceptions with messages that say what was wrong and what to do."""


class SelfForcingError(ValueError):
    """Base class: bad input the user can fix."""


class CheckpointError(SelfForcingError):
    """A weights file that cannot be read or is not what the caller expected."""
