"""Fault injection, the testing hook of the training loop: ``$FEWSHOT_FAULT`` (see :class:`FaultPlan`)."""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

from fewshot_runner.errors import UserError

FAULT_ENV = "FEWSHOT_FAULT"
FAULT_ACTIONS = ("kill", "term", "int", "enospc", "nan")
FAULT_PHASES = ("step", "val", "ckpt", "best")


@dataclass(frozen=True)
class Fault:
    action: str
    phase: str
    step: int


class FaultPlan:
    """A testing hook: deterministic faults at chosen points of training, from ``$FEWSHOT_FAULT``.

    ``FEWSHOT_FAULT="ACTION@PHASE:STEP[,ACTION@PHASE:STEP...]"``, each fault fired at most once:

    PHASE (in training step STEP, steps counted from 1):
      ``step``  after the outer update, before anything is logged (``nan``: the step's inputs
                become NaN before the update instead)
      ``val``   after the validation episodes ran, before their metrics are logged
      ``ckpt``  while ``checkpoints/last.pt`` is written: the temporary file holds half its bytes
      ``best``  the same for ``checkpoints/best.pt``
    ACTION:
      ``kill``   SIGKILL this process         ``term``/``int``  send it SIGTERM/SIGINT (a graceful stop)
      ``enospc`` raise OSError(ENOSPC), as a full disk does      ``nan`` NaN inputs (phase ``step`` only)

    e.g. ``FEWSHOT_FAULT=kill@val:6`` or ``FEWSHOT_FAULT=kill@ckpt:4,term@step:2``.  Unset, it costs nothing.
    """

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        self.fired: set[Fault] = set()

    @classmethod
    def parse(cls, spec: str | None) -> "FaultPlan":
        faults = []
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            try:
                action, rest = item.split("@", 1)
                phase, step = rest.split(":", 1)
                fault = Fault(action.strip(), phase.strip(), int(step))
            except ValueError:
                fault = None
            if fault is None or fault.action not in FAULT_ACTIONS or fault.phase not in FAULT_PHASES \
                    or (fault.action == "nan" and fault.phase != "step"):
                raise UserError(f"{FAULT_ENV}={spec!r} is not a fault list; use ACTION@PHASE:STEP with ACTION one of "
                                f"{', '.join(FAULT_ACTIONS)} and PHASE one of {', '.join(FAULT_PHASES)}, or unset it")
            faults.append(fault)
        return cls(faults)

    @classmethod
    def from_env(cls) -> "FaultPlan":
        return cls.parse(os.environ.get(FAULT_ENV))

    def _due(self, phase: str, step: int, nan: bool = False) -> list[Fault]:
        due = [f for f in self.faults if f.phase == phase and f.step == step and (f.action == "nan") == nan
               and f not in self.fired]
        self.fired.update(due)
        return due

    def poison(self, step: int) -> bool:
        """True when the inputs of training step ``step`` must be made NaN."""
        return bool(self.faults) and bool(self._due("step", step, nan=True))

    def at(self, phase: str, step: int) -> None:
        if self.faults:
            for f in self._due(phase, step):
                self._fire(f.action)

    def on_write(self, phase: str, step: int) -> Callable[[Any], None] | None:
        """A ``before_commit`` hook for :func:`checkpoint.atomic_write`, or None."""
        due = self._due(phase, step) if self.faults else []
        if not due:
            return None

        def hook(f) -> None:
            size = f.tell()
            f.truncate(size // 2)  # a torn temporary file, as a kill in mid-write leaves
            f.flush()
            os.fsync(f.fileno())
            for fault in due:
                self._fire(fault.action)

        return hook

    @staticmethod
    def _fire(action: str) -> None:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # not reached: SIGKILL is delivered before the call returns
        elif action in ("term", "int"):
            os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def poisoned(batch):
    """The batch with NaN inputs (``nan@step:N``): any batch type with ``map_inputs``."""
    return batch.map_inputs(lambda x: x * float("nan"))
