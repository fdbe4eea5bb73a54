"""MAML (Finn, Abbeel & Levine, 2017) and first-order MAML.

All of the machinery (the functional inner loop, the task-execution policy, prediction) is shared
with the gradient-based family in :mod:`fewshot_runner.algorithms.gradient`; what is MAML's own is
its update rule, plain SGD at one rate, and whether the inner gradients are differentiated.
"""

from __future__ import annotations

from torch import nn

from fewshot_runner.algorithms.adaptation import ScalarLR, UpdateRule
from fewshot_runner.algorithms.gradient import GradientLearner


class MAML(GradientLearner):
    """backbone + linear head (n_way outputs), adapted per task by ``inner_steps`` SGD steps at
    ``inner_lr``; ``first_order=True`` gives FOMAML.  Evaluation adapts with ``eval_inner_steps`` steps.

    batch_tasks (``device.batch_tasks``): ``off`` adapts task after task (the plain loop); ``on`` all
    tasks of a batch at once under ``torch.func.vmap``; ``groups`` with each task's weights as the groups
    of grouped convolutions (Conv4); ``auto`` chooses per batch (:func:`~fewshot_runner.algorithms.
    gradient.task_mode`).  All compute the same meta-gradient.
    """

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_lr: float = 0.4,
                 inner_steps: int = 1, eval_inner_steps: int = 3, first_order: bool = False,
                 batch_tasks: str = "off") -> None:
        super().__init__(backbone, n_way, feature_dim, inner_steps, eval_inner_steps, batch_tasks)
        self.inner_lr = inner_lr
        self.first_order = first_order

    def update_rule(self) -> UpdateRule:
        return ScalarLR(self.inner_lr)

    def second_order(self) -> bool:
        return not self.first_order
