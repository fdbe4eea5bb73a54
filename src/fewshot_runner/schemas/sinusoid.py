"""Schema of ``data=sinusoid``: the MAML paper's sinusoid regression tasks (data/sinusoid.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from fewshot_runner.schemas import register
from fewshot_runner.schemas.data import DataConfig


@register("data", "sinusoid")
@dataclass
class SinusoidConfig(DataConfig):
    """y = A sin(x - phase) per task; ``n_shot``: support points K, ``n_query``: points scored; ``n_way`` is 1."""

    task_kind: ClassVar[str] = "regression"  # (not a key: preflight reads it, so data.n_way=1 is not refused)
    _target_: str = "fewshot_runner.data.sinusoid.Sinusoid"
    amplitude_min: float = 0.1  # amplitude A ~ U[amplitude_min, amplitude_max] (the paper: [0.1, 5])
    amplitude_max: float = 5.0  # (the upper end of the amplitude's range)
    phase_min: float = 0.0  # phase ~ U[phase_min, phase_max] (the paper: [0, pi])
    phase_max: float = math.pi  # (the upper end of the phase's range)
    x_min: float = -5.0  # points x ~ U[x_min, x_max] (the paper: [-5, 5])
    x_max: float = 5.0  # (the upper end of the points' range)
    seed: int = 0  # mixed into every split's task stream (train, val and test streams stay disjoint)
