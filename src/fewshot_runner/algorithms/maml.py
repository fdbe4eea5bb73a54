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


def grouped_forward(net: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``net`` = Sequential(backbone with ``forward_tasks``, Linear head) on T tasks at once, each with
    its own weights: params (T, *shape), x (T, N, ...) -> logits (T, N, n_way)."""
    backbone, head = net[0], net[1]
    feats = backbone.forward_tasks(x, {k[2:]: v for k, v in params.items() if k.startswith("0.")})
    w, b = params["1.weight"], params.get("1.bias")
    logits = torch.bmm(feats, w.transpose(1, 2))
    return logits + b.unsqueeze(1) if b is not None else logits


def adapt_grouped(net: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, lr: float,
                  steps: int, create_graph: bool) -> torch.Tensor:
    """:func:`adapt_batched` without torch.func: every task gets its own copy of the weights (a
    (T, ...) expand of the meta-parameters), the backbone runs the tasks as the groups of grouped
    convolutions (``forward_tasks``), and one ``autograd.grad`` of the summed support losses gives each
    task its own inner gradient (task t's loss depends on task t's copy only).  Plain autograd, so the
    fused batch-norm op (exact double backward) applies, and none of vmap's per-op overhead: the MAML
    Omniglot net's 32-task step on 2 CPU cores (docs/speed.md).  Returns the query logits (T, Q, n_way).
    """
    t = y.shape[0]
    fast = {k: v.unsqueeze(0).expand(t, *v.shape) for k, v in params.items()}
    for _ in range(steps):
        logits = grouped_forward(net, fast, x)
        loss = cross_entropy(logits.flatten(0, 1), y.flatten()) * t  # = sum over tasks of each task's mean loss
        grads = torch.autograd.grad(loss, tuple(fast.values()), create_graph=create_graph)
        fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads)}
    return grouped_forward(net, fast, xq)


def disable_running_stats(module: nn.Module) -> None:
    """Make every batch norm use batch statistics in train and eval mode (as in MAML)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


# device.batch_tasks: off (task after task), on (torch.func.vmap over the tasks), groups (the tasks as
# the groups of grouped convolutions, Conv4 only: adapt_grouped), auto (see MAML)
BATCH_TASKS = ("off", "on", "groups", "auto")

# device.batch_tasks=auto on CPU: the tasks at once pay for tasks this small (32-task steps, 2 cores,
# docs/speed.md): strided Omniglot net, 10 images per task: groups 166, vmap 205, loop 258 ms;
# 20: 221 / 293 / 299; 80: 558 / 879 / 507.  Max-pool net: 10 images: groups 306, loop 359; 80:
# 1,143 vs 877 (vmap is slower than the loop there at every size).
CPU_BATCHED_MAX_IMAGES = 32


class MAML(nn.Module):
    """backbone + linear head (n_way outputs), adapted per task by ``inner_steps`` SGD steps.

    first_order=True gives FOMAML.  Evaluation adapts with ``eval_inner_steps`` steps.
    Batch norm uses the batch statistics of the data it sees (support in the inner loop,
    query for the outer loss), in training and at test time, as in the paper.

    batch_tasks: ``off`` adapts task after task (the plain loop); ``on`` adapts all tasks of a
    batch at once with ``torch.func.vmap`` (:func:`adapt_batched`; memory grows with the tasks per
    chunk, see ``train.task_chunk``); ``groups`` too, with each task's weights as the groups of
    grouped convolutions and plain autograd (:func:`adapt_grouped`, Conv4 backbones); ``auto``:
    ``on`` for CUDA tensors; on CPU, for small tasks (at most ``CPU_BATCHED_MAX_IMAGES`` support +
    query images: the MAML paper's Omniglot setting, 1 query per class) ``groups`` on Conv4, ``on``
    on other nets without max-pool blocks, else ``off`` (with 15 queries per class the loop, with
    the fused kernels and task threads, is faster: docs/speed.md).  All compute the same
    meta-gradient (tests/algorithms/test_maml.py checks them against the loop in float64).
    """

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_lr: float = 0.4,
                 inner_steps: int = 1, eval_inner_steps: int = 3, first_order: bool = False,
                 batch_tasks: str = "off") -> None:
        super().__init__()
        if inner_steps < 1 or eval_inner_steps < 1:
            raise UserError("algo.inner_steps and algo.eval_inner_steps must be >= 1")
        if batch_tasks not in BATCH_TASKS:
            raise UserError(f"batch_tasks={batch_tasks!r} is not one of {', '.join(BATCH_TASKS)}; use device.batch_tasks=auto")
        self.net = nn.Sequential(backbone, nn.Linear(feature_dim, n_way))
        disable_running_stats(self.net)
        make_transform_safe(self.net)  # batch norm from primitives under vmap (correct second order)
        self.batch_tasks = batch_tasks
        # (ConvBlock.pool: max-pool blocks, where the fused kernels make the per-task loop faster)
        self._cpu_vmap_ok = not any(getattr(m, "pool", False) is True for m in backbone.modules())
        self._groups_ok = hasattr(backbone, "forward_tasks")  # (Conv4)
        if batch_tasks == "groups" and not self._groups_ok:
            raise UserError(f"device.batch_tasks=groups needs a Conv4 backbone (this one is "
                            f"{type(backbone).__name__}); use device.batch_tasks=on (vmap) or auto")
        self.n_way = n_way
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order

    # the meta-loss is a mean of per-task losses that share nothing but the weights: the engine may
    # split a batch's tasks over threads (device.task_threads) when they run one by one
    independent_tasks = True

    def runs_tasks_one_by_one(self, episodes: Episode) -> bool:
        return self._batched(episodes) == "off"

    def meta_params(self) -> Params:
        return dict(self.net.named_parameters())

    def task_loss(self, ep: Episode, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and logits of one task after adaptation from ``params``."""
        fast = adapt(self.net, params, ep.support_x, ep.support_y, self.inner_lr, self.inner_steps,
                     create_graph=not self.first_order)
        logits = functional_call(self.net, fast, (ep.query_x,))
        return cross_entropy(logits, ep.query_y), logits

    def _batched(self, episodes: Episode) -> str:
        """How this batch's tasks run: "off" (one by one), "on" (vmap) or "groups" (adapt_grouped)."""
        mode = self.batch_tasks
        if mode != "auto":
            return mode
        if episodes.support_x.is_cuda:
            return "on"
        per_task = episodes.support_x.shape[1] + episodes.query_x.shape[1]
        if per_task > CPU_BATCHED_MAX_IMAGES:
            return "off"
        if self._groups_ok:
            return "groups"
        return "on" if self._cpu_vmap_ok else "off"

    def _adapt_all(self, mode: str, params: Params, episodes: Episode, steps: int, create_graph: bool):
        adapt_fn = adapt_grouped if mode == "groups" else adapt_batched
        return adapt_fn(self.net, params, episodes.support_x, episodes.support_y, episodes.query_x,
                        self.inner_lr, steps, create_graph=create_graph)

    def meta_loss(self, episodes: Episode):
        params = self.meta_params()
        mode = self._batched(episodes)
        if mode != "off":
            logits = self._adapt_all(mode, params, episodes, self.inner_steps, create_graph=not self.first_order)
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
        mode = self._batched(episodes)
        if mode == "on":  # torch.func.grad needs no enable_grad; no outer graph is built
            params = {k: v.detach() for k, v in self.meta_params().items()}
            return self._adapt_all(mode, params, episodes, self.eval_inner_steps, create_graph=False).detach()
        params = {k: v.detach().requires_grad_() for k, v in self.meta_params().items()}
        if mode == "groups":
            with torch.enable_grad():
                return self._adapt_all(mode, params, episodes, self.eval_inner_steps, create_graph=False).detach()
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
