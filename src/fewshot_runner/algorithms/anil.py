"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, 2020): MAML whose inner loop adapts the
linear head only; the body (the backbone) is learned by the outer loop alone.

The inner loop is the gradient family's shared one with ``keys`` set to the head's parameters
(:func:`~fewshot_runner.algorithms.adaptation.adapt`): the body's parameters pass through unchanged and
are still differentiated by the outer loss.  Its meta-gradient is MAML's with a zero inner rate for the
body (tests/algorithms/test_anil.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from fewshot_runner.algorithms.maml import MAML


class ANIL(MAML):
    """MAML (same keys: ``inner_lr``, ``inner_steps``, ``eval_inner_steps``, ``first_order``, ``batch_tasks``)
    whose inner steps, in training and at test time, update the head (``net.1``) only."""

    def adapted_keys(self) -> Sequence[str]:
        return [name for name, _ in self.net[1].named_parameters(prefix="1")]  # 1.weight, 1.bias
