"""Errors a user can fix.  The CLI prints ``str(error)`` as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""

    exit_code = 2


class DataError(UserError):
    """The data set is missing, corrupt or too small for the requested episodes."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, foreign or incompatible."""
