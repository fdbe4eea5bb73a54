"""Schemas of the algo group (``algo=NAME``): MAML's gradient-based family and ProtoNet.

A new family may put its schemas in a module of its own here (``schemas/<family>.py``): every module
of this package is imported and its ``@register``-ed dataclasses stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fewshot_runner.schemas import register


@register("algo", "maml")
@dataclass
class MAMLConfig:
    _target_: str = "fewshot_runner.algorithms.maml.MAML"
    inner_lr: float = 0.4  # learning rate of the inner (adaptation) steps
    inner_steps: int = 1  # adaptation steps per task in training
    eval_inner_steps: int = 3  # adaptation steps at validation and test
    first_order: bool = False  # true: FOMAML (no second-order term)
    batch_tasks: str = "${device.batch_tasks}"  # off | on (vmap) | groups (grouped convolutions) | auto


@register("algo", "metasgd")
@dataclass
class MetaSGDConfig:
    _target_: str = "fewshot_runner.algorithms.metasgd.MetaSGD"
    # the learned inner rates (one per weight, each parameter's shape) start at this value everywhere
    inner_lr_init: float = 0.4
    # set: the rates start uniform in [inner_lr_init, inner_lr_init_max] (the paper: U[0.005, 0.1]); null: constant
    inner_lr_init_max: Optional[float] = None
    inner_steps: int = 1  # adaptation steps per task in training (the paper: 1)
    eval_inner_steps: int = 1  # adaptation steps at validation and test, with the learned rates
    first_order: bool = False  # true: no second-order term (the rates still get a gradient)
    rates_lr: Optional[float] = None  # outer learning rate of the rates; null: train.outer_lr, as the weights
    batch_tasks: str = "${device.batch_tasks}"  # off | on (vmap) | groups (grouped convolutions) | auto


@register("algo", "anil")
@dataclass
class ANILConfig:
    _target_: str = "fewshot_runner.algorithms.anil.ANIL"
    inner_lr: float = 0.4  # learning rate of the inner steps, which adapt the linear head only
    inner_steps: int = 1  # adaptation steps per task in training
    eval_inner_steps: int = 3  # adaptation steps at validation and test
    first_order: bool = False  # true: no second-order term
    batch_tasks: str = "${device.batch_tasks}"  # off | on (vmap) | groups (grouped convolutions) | auto


@register("algo", "reptile")
@dataclass
class ReptileConfig:
    _target_: str = "fewshot_runner.algorithms.reptile.Reptile"
    # learning rate of the inner optimizer's steps (training and test time); null: the inner optimizer's own,
    # sgd 0.1 or adam 1e-3 (the paper's), so that choosing the optimizer brings its rate along
    inner_lr: Optional[float] = None
    inner_steps: int = 5  # inner steps per training task, on its support + query images
    inner_batch: Optional[int] = 10  # images per training inner step (a random walk through the task); null: all
    eval_inner_steps: int = 50  # fine-tuning steps on the support set at validation and test
    outer_step_size: float = 1.0  # eps in theta += eps * mean(phi - theta) at the first step ...
    outer_step_size_final: float = 0.0  # ... annealed linearly to this at train.steps
    # batch norm at test time: true normalises a task's queries together (the paper's reported setting);
    # false scores each query image with the support set alone
    transductive: bool = False
    # sgd, or adam (the paper's Omniglot setting: inner_lr 1e-3, beta1 0); Adam as Kingma & Ba, bias-corrected
    inner_optimizer: str = "sgd"
    inner_beta1: float = 0.0  # adam: decay of the first moment (the paper's code: 0, no momentum)
    inner_beta2: float = 0.999  # adam: decay of the second moment
    inner_eps: float = 1e-8  # adam: added to the root of the second moment
    # adam: carry (the moments and step count go on from task to task and every test task starts from them, as the
    # paper's code; checkpointed; training runs the tasks in order) or reset (each task starts from zero moments)
    inner_state: str = "carry"
    batch_tasks: str = "${device.batch_tasks}"  # training: groups (grouped convolutions) or auto; else task by task


@register("algo", "protonet")
@dataclass
class ProtoNetConfig:
    _target_: str = "fewshot_runner.algorithms.protonet.PrototypicalNetworks"
    # training only: average the episode loss over the rotations of each class's shot + query images
    # between support and query (each image is the support once per n_shot), from the same embeddings
    rotate_support: bool = False
