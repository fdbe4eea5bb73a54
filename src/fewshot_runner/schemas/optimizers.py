"""Schemas of the optimizer group (``optimizer=NAME``); its learning rate is train.outer_lr, its parameter
groups the learner's param_groups()."""

from __future__ import annotations

from dataclasses import dataclass, field

from fewshot_runner.schemas import register


# The outer optimizer (``optimizer=adam|sgd|adamw``); its learning rate is train.outer_lr, its parameter
# groups the learner's param_groups().
@register("optimizer", "adam")
@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False


@register("optimizer", "adamw")
@dataclass
class AdamWConfig:
    _target_: str = "torch.optim.AdamW"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01


@register("optimizer", "sgd")
@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
