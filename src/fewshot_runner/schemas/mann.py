"""Schema of ``algo=mann``: memory-augmented neural networks (Santoro et al. 2016)."""

from __future__ import annotations

from dataclasses import dataclass

from fewshot_runner.schemas import register


@register("algo", "mann")
@dataclass
class MANNConfig:
    _target_: str = "fewshot_runner.algorithms.mann.MANN"
    controller_size: int = 200  # LSTM controller units (the paper: 200)
    memory_slots: int = 128  # memory rows N (the paper: 128)
    memory_width: int = 40  # width W of a memory row (the paper: 40)
    read_heads: int = 4  # read heads, each with its own key and write gate (the paper: 4)
    gamma: float = 0.95  # usage decay in w_u <- gamma * w_u + w_r + w_w (the paper gives no value)
