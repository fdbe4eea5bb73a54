"""MAML (Finn, Abbeel & Levine, 2017) and first-order MAML.

The math is in small pure functions over a parameter dict; :class:`MAML` is a shell.
Adaptation is functional (``torch.func.functional_call``): the meta-parameters are never
modified in place, so the outer gradient flows through the inner steps exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from fewshot_runner.algorithms.base import accuracy, cross_entropy
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

Params = dict[str, torch.Tensor]


def sgd_update(params: Params, grads, lr: float) -> Params:
    """One plain SGD step, out of place: {k: p - lr * g}."""
    return {k: p - lr * g for (k, p), g in zip(params.items(), grads)}


def adapt(net: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int,
          create_graph: bool) -> Params:
    """``steps`` SGD steps on the support loss, from ``params``.

    create_graph=True keeps the graph of the inner gradients (second-order MAML); False
    treats them as constants (first-order MAML, and evaluation).
    """
    for _ in range(steps):
        loss = cross_entropy(functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)
        params = sgd_update(params, grads, lr)
    return params


def disable_running_stats(module: nn.Module) -> None:
    """Make every batch norm use batch statistics in train and eval mode (as in MAML)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


class MAML(nn.Module):
    """backbone + linear head (n_way outputs), adapted per task by ``inner_steps`` SGD steps.

    first_order=True gives FOMAML.  Evaluation adapts with ``eval_inner_steps`` steps.
    Batch norm uses the batch statistics of the data it sees (support in the inner loop,
    query for the outer loss), in training and at test time, as in the paper.
    """

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_lr: float = 0.4,
                 inner_steps: int = 1, eval_inner_steps: int = 3, first_order: bool = False) -> None:
        super().__init__()
        if inner_steps < 1 or eval_inner_steps < 1:
            raise UserError("algo.inner_steps and algo.eval_inner_steps must be >= 1")
        self.net = nn.Sequential(backbone, nn.Linear(feature_dim, n_way))
        disable_running_stats(self.net)
        self.n_way = n_way
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order

    def meta_params(self) -> Params:
        return dict(self.net.named_parameters())

    def task_loss(self, ep: Episode, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and logits of one task after adaptation from ``params``."""
        fast = adapt(self.net, params, ep.support_x, ep.support_y, self.inner_lr, self.inner_steps,
                     create_graph=not self.first_order)
        logits = functional_call(self.net, fast, (ep.query_x,))
        return cross_entropy(logits, ep.query_y), logits

    def meta_loss(self, episodes: Episode):
        params = self.meta_params()
        losses, accs = [], []
        for t in range(episodes.n_tasks):
            ep = episodes.task(t)
            loss, logits = self.task_loss(ep, params)
            losses.append(loss)
            accs.append(accuracy(logits.detach(), ep.query_y))
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.detach(), "acc": torch.stack(accs).mean()}

    def predict(self, episodes: Episode) -> torch.Tensor:
        self.check_n_way(episodes.n_way)
        params = {k: v.detach().requires_grad_() for k, v in self.meta_params().items()}
        out = []
        for t in range(episodes.n_tasks):
            ep = episodes.task(t)
            with torch.enable_grad():
                fast = adapt(self.net, params, ep.support_x, ep.support_y, self.inner_lr,
                             self.eval_inner_steps, create_graph=False)
            with torch.no_grad():
                out.append(functional_call(self.net, {k: v.detach() for k, v in fast.items()}, (ep.query_x,)))
        return torch.stack(out)

    def check_n_way(self, n_way: int) -> None:
        if n_way != self.n_way:
            raise UserError(
                f"this MAML model has a {self.n_way}-way head and cannot be tested {n_way}-way; "
                f"use data.n_way={self.n_way} (or train a {n_way}-way model)"
            )
