"""Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML whose inner learning rate is a learned tensor of each
parameter's shape, meta-learned with the weights.

Everything else (the functional inner loop, the task executions, prediction) is the gradient family's
shell, :mod:`fewshot_runner.algorithms.gradient`; Meta-SGD's own part is the rates and their update
rule, :class:`~fewshot_runner.algorithms.adaptation.PerParameterLR`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from fewshot_runner.algorithms.adaptation import PerParameterLR, UpdateRule
from fewshot_runner.algorithms.gradient import GradientLearner
from fewshot_runner.errors import UserError


def rate_key(name: str) -> str:
    """A parameter name as a ParameterDict key (keys cannot hold dots): ``0.conv1.weight`` -> ``0__conv1__weight``."""
    return name.replace(".", "__")


class MetaSGD(GradientLearner):
    """backbone + linear head (n_way outputs), adapted per task by ``inner_steps`` steps of
    ``p - alpha_p * g`` where ``alpha_p`` (each parameter's shape) is meta-learned.

    The rates start at ``inner_lr_init`` everywhere (``inner_lr_init_max`` set: uniform in
    [inner_lr_init, inner_lr_init_max], the paper's U[0.005, 0.1]); they live in ``self.inner_lrs`` and so in the
    ``state_dict`` (checkpoints, resume and ``fewshot eval`` carry them).  ``rates_lr``: the outer
    learning rate of the rates (None: ``train.outer_lr``, one group with the weights).  Test time adapts
    with the learned rates for ``eval_inner_steps`` steps (the paper: one, the number they were learned for).
    """

    # the rates are learned, so the test-time inner rate is not a setting
    eval_settings: ClassVar[tuple[str, ...]] = ("eval_inner_steps",)

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_lr_init: float = 0.4,
                 inner_lr_init_max: Optional[float] = None, inner_steps: int = 1, eval_inner_steps: int = 1,
                 first_order: bool = False, rates_lr: Optional[float] = None, batch_tasks: str = "off") -> None:
        super().__init__(backbone, n_way, feature_dim, inner_steps, eval_inner_steps, batch_tasks)
        if inner_lr_init_max is not None and inner_lr_init_max < inner_lr_init:
            raise UserError(f"algo.inner_lr_init_max={inner_lr_init_max} is below algo.inner_lr_init={inner_lr_init}")
        rates = {}
        for name, p in self.net.named_parameters():
            r = torch.full_like(p.detach(), inner_lr_init)
            if inner_lr_init_max is not None:
                r.uniform_(inner_lr_init, inner_lr_init_max)  # torch's global generator: seeded by the run's seed
            rates[rate_key(name)] = nn.Parameter(r)
        self.inner_lrs = nn.ParameterDict(rates)
        self.first_order = first_order
        self.rates_lr = rates_lr

    def update_rule(self) -> UpdateRule:
        return PerParameterLR({name: self.inner_lrs[rate_key(name)] for name, _ in self.net.named_parameters()})

    def second_order(self) -> bool:
        return not self.first_order

    def param_groups(self) -> list[dict[str, Any]]:
        if self.rates_lr is None:
            return super().param_groups()
        return [{"params": list(self.net.parameters())},
                {"params": list(self.inner_lrs.parameters()), "lr": float(self.rates_lr)}]
