"""Schema of ``algo=mamlpp``: MAML++ (Antoniou, Edwards & Storkey 2019), each of its changes a switch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fewshot_runner.schemas import register


@register("algo", "mamlpp")
@dataclass
class MAMLPlusPlusConfig:
    _target_: str = "fewshot_runner.algorithms.mamlpp.MAMLPlusPlus"
    inner_lr: float = 0.1  # inner learning rate (lslr=true: the initial value of every learned rate)
    inner_steps: int = 5  # adaptation steps per task in training
    eval_inner_steps: int = 5  # adaptation steps at validation and test (at most inner_steps with per-step values)
    multi_step_loss: bool = True  # MSL: the outer loss weighs the query loss after every inner step
    # MSL: steps over which the weights anneal from uniform to the last step alone (then the last step only);
    # null: train.steps // 10 (the paper: 10 of 100 epochs)
    msl_steps: Optional[int] = None
    first_order: bool = False  # true: first order throughout (overrides first_order_until)
    # derivative-order annealing: first order before this training step, second order from it; 0: second order
    # throughout; null: train.steps // 2 (the paper: the first 50 epochs first order)
    first_order_until: Optional[int] = None
    lslr: bool = True  # LSLR: a learned inner rate per parameter tensor and inner step
    rates_lr: Optional[float] = None  # outer learning rate of the learned rates; null: train.outer_lr, with the weights
    per_step_bn_weights: bool = True  # BNWB: batch-norm gamma and beta per inner step (meta-learned, not adapted)
    # BNRS: batch-norm running statistics per inner step, updated in training (the tasks then run in the per-task
    # loop, one thread: 0.99x the plain reference against 2.47x without), used at validation and test only with
    # eval_bn=running; off by default, as eval_bn=batch never reads them
    per_step_bn_stats: bool = False
    # what batch norm normalises with at validation and test: batch (each support / query set's own statistics,
    # as the paper's code) | running (the per-step running statistics; measured here: at chance, see mamlpp.py)
    eval_bn: str = "batch"
    batch_tasks: str = "${device.batch_tasks}"  # off | on (vmap) | groups (grouped convolutions) | auto
