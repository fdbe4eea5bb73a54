"""SIGINT/SIGTERM during training: the current step finishes, ``last.pt`` is written, the loggers are
closed, and the exit message says how to resume (exit code 130/143).  A second signal stops at once."""

from __future__ import annotations

import signal
from contextlib import contextmanager


class Interrupted(Exception):
    """Raised after a graceful stop wrote its checkpoint."""


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.signum is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self.signum = signum

        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

