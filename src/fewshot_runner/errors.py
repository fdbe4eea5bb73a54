"""Errors a user can fix.  The CLI prints ``str(error)`` as one line and exits non-zero."""

import sys


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""

    exit_code = 2


class DataError(UserError):
    """The data set is missing, corrupt or too small for the requested episodes."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, foreign or incompatible."""


def fail(msg: str, code: int = 2) -> None:
    """Print ``error: msg`` on stderr and exit with ``code`` (the CLI's one-line refusal)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)
