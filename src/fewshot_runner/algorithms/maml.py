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
from fewshot_runner.backbones.norm import make_transform_safe
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


def adapt_batched(net: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, lr: float,
                  steps: int, create_graph: bool) -> torch.Tensor:
    """:func:`adapt` for every task at once: ``torch.func.vmap`` over the leading task dimension of
    x (T, S, ...), y (T, S) and xq (T, Q, ...), with ``torch.func.grad`` inner steps; returns the
    query logits (T, Q, n_way) of the adapted nets.

    The meta-parameters are shared (not batched); the outer gradient flows through vmap and the
    inner gradients by ordinary autograd (create_graph=False detaches the inner gradients: first
    order).  Batch norm inside must be written from primitives (:mod:`fewshot_runner.backbones.norm`).
    """
    from torch.func import grad, vmap

    def support_loss(p: Params, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return cross_entropy(functional_call(net, p, (xs,)), ys)

    def one_task(p: Params, xs: torch.Tensor, ys: torch.Tensor, xqs: torch.Tensor) -> torch.Tensor:
        for _ in range(steps):
            g = grad(support_loss)(p, xs, ys)
            if not create_graph:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - lr * g[k] for k in p}
        return functional_call(net, p, (xqs,))

    return vmap(one_task, in_dims=(None, 0, 0, 0), randomness="same")(params, x, y, xq)


def disable_running_stats(module: nn.Module) -> None:
    """Make every batch norm use batch statistics in train and eval mode (as in MAML)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


# device.batch_tasks=auto on CPU: vmap over tasks pays for tasks this small (strided Omniglot net,
# 32-task steps, measured here: 10 images per task 1.9x the loop, 20: 1.55x, 30: 1.5x, 80: 0.86x).
CPU_VMAP_MAX_IMAGES = 32


class MAML(nn.Module):
    """backbone + linear head (n_way outputs), adapted per task by ``inner_steps`` SGD steps.

    first_order=True gives FOMAML.  Evaluation adapts with ``eval_inner_steps`` steps.
    Batch norm uses the batch statistics of the data it sees (support in the inner loop,
    query for the outer loss), in training and at test time, as in the paper.

    batch_tasks: ``off`` adapts task after task (the plain loop); ``on`` adapts all tasks of a
    batch at once with ``torch.func.vmap`` (:func:`adapt_batched`; memory grows with the tasks per
    chunk, see ``train.task_chunk``); ``auto``: ``on`` for CUDA tensors; on CPU ``on`` only for small
    tasks (at most ``CPU_VMAP_MAX_IMAGES`` support + query images) on a backbone without max-pool
    blocks, where the per-task loop is dominated by per-op overhead (the MAML paper's strided
    Omniglot net, 1 query per class: vmap 340 vs loop 650 ms per 32-task step here), else ``off``
    (with 15 queries per class, or with the fused max-pool kernels, the loop is faster: docs/speed.md).
    Both compute the same meta-gradient (tests/algorithms/test_maml.py checks it in float64).
    """

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_lr: float = 0.4,
                 inner_steps: int = 1, eval_inner_steps: int = 3, first_order: bool = False,
                 batch_tasks: str = "off") -> None:
        super().__init__()
        if inner_steps < 1 or eval_inner_steps < 1:
            raise UserError("algo.inner_steps and algo.eval_inner_steps must be >= 1")
        if batch_tasks not in ("off", "on", "auto"):
            raise UserError(f"batch_tasks={batch_tasks!r} is not one of off, on, auto; use device.batch_tasks=auto")
        self.net = nn.Sequential(backbone, nn.Linear(feature_dim, n_way))
        disable_running_stats(self.net)
        make_transform_safe(self.net)  # batch norm from primitives under vmap (correct second order)
        self.batch_tasks = batch_tasks
        # (ConvBlock.pool: max-pool blocks, where the fused kernels make the per-task loop faster)
        self._cpu_vmap_ok = not any(getattr(m, "pool", False) is True for m in backbone.modules())
        self.n_way = n_way
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order

    # the meta-loss is a mean of per-task losses that share nothing but the weights: the engine may
    # split a batch's tasks over threads (device.task_threads) when they run one by one
    independent_tasks = True

    def runs_tasks_one_by_one(self, episodes: Episode) -> bool:
        return not self._batched(episodes)

    def meta_params(self) -> Params:
        return dict(self.net.named_parameters())

    def task_loss(self, ep: Episode, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and logits of one task after adaptation from ``params``."""
        fast = adapt(self.net, params, ep.support_x, ep.support_y, self.inner_lr, self.inner_steps,
                     create_graph=not self.first_order)
        logits = functional_call(self.net, fast, (ep.query_x,))
        return cross_entropy(logits, ep.query_y), logits

    def _batched(self, episodes: Episode) -> bool:
        if self.batch_tasks != "auto":
            return self.batch_tasks == "on"
        if episodes.support_x.is_cuda:
            return True
        per_task = episodes.support_x.shape[1] + episodes.query_x.shape[1]
        return self._cpu_vmap_ok and per_task <= CPU_VMAP_MAX_IMAGES

    def meta_loss(self, episodes: Episode):
        params = self.meta_params()
        if self._batched(episodes):
            logits = adapt_batched(self.net, params, episodes.support_x, episodes.support_y, episodes.query_x,
                                   self.inner_lr, self.inner_steps, create_graph=not self.first_order)
            loss = cross_entropy(logits, episodes.query_y)  # the mean over tasks of equal-size query sets
            acc = accuracy(logits.detach(), episodes.query_y)
            return loss, {"loss": loss.detach(), "acc": acc}
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
        if self._batched(episodes):  # torch.func.grad needs no enable_grad; no outer graph is built
            params = {k: v.detach() for k, v in self.meta_params().items()}
            logits = adapt_batched(self.net, params, episodes.support_x, episodes.support_y, episodes.query_x,
                                   self.inner_lr, self.eval_inner_steps, create_graph=False)
            return logits.detach()
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
