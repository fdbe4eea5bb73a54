"""Reptile (Nichol, Achiam & Schulman, 2018): a first-order meta-learner whose outer update is not a
gradient step.  For each task of a meta-batch, ``inner_steps`` plain SGD steps from the weights theta
give phi_task; then theta <- theta + eps * mean_tasks(phi_task - theta), with the outer step size eps
annealed linearly from ``outer_step_size`` to ``outer_step_size_final`` over training (the paper: 1 -> 0).

The math is in two pure functions (:func:`inner_sgd` / :func:`inner_sgd_grouped`, the same steps task by
task or for every task at once as grouped convolutions, and :func:`reptile_update`); the class is a
shell with its own ``outer_step`` (the engine's optimizer is not used).

Data: Reptile trains on the task's own data, so a training task's support and query images form one
pool (``train_n_shot + train_n_query`` images per class; the paper's Omniglot setting is 10 per class).
Each inner step takes ``inner_batch`` images of it, walking one random permutation per task and step of
training (torch's global generator, so a resumed run draws the same); ``inner_batch`` null: the whole pool.

Test time (inherited from the gradient family): ``eval_inner_steps`` SGD steps at ``inner_lr`` on the
whole support set, then the queries.  Batch norm uses batch statistics throughout; ``transductive``
chooses how the queries are normalised: all at once (True, the paper's reported setting), or each query
image with the support set alone (False, the default: no query sees another).
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn
from torch.func import functional_call, vmap

from fewshot_runner.algorithms.adaptation import LossFn, Params, ScalarLR, UpdateRule, adapt, grouped_forward
from fewshot_runner.algorithms.base import accuracy, cross_entropy
from fewshot_runner.algorithms.gradient import GradientLearner
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError


def linear_anneal(start: float, final: float, step: int, total: int) -> float:
    """The outer step size at ``step`` (0-based) of ``total``: ``start`` at step 0, moving linearly towards
    ``final`` (reached at ``total``), as the paper's code (frac_done = step / total)."""
    frac = step / total if total > 0 else 0.0
    return (1.0 - frac) * start + frac * final


def reptile_update(theta: Params, phis: Params, eps: float) -> Params:
    """theta + eps * mean_tasks(phi - theta); ``phis`` holds each parameter's adapted copies (T, *shape)."""
    return {k: p + eps * (phis[k] - p.unsqueeze(0)).mean(0) for k, p in theta.items()}


def batch_indices(n_images: int, batch: Optional[int], perms: Optional[torch.Tensor], step: int):
    """Which pool images inner step ``step`` uses: (T, batch) positions cycling through each task's
    permutation ``perms`` (T, n_images); None: the whole pool (``batch`` null or >= the pool)."""
    if perms is None:
        return None
    pos = (step * batch + torch.arange(batch, device=perms.device)) % n_images
    return perms[:, pos]


def inner_sgd(net: nn.Module, theta: Params, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int,
              batch: Optional[int], perms: Optional[torch.Tensor], loss_fn: LossFn = cross_entropy,
              metric_fn: LossFn = accuracy):
    """Each task's ``steps`` SGD steps from ``theta`` on its pool x (T, N, ...), y (T, N), one task after
    another.  Returns the adapted weights stacked over tasks (T, *shape) and the mean batch loss and
    accuracy (``metric_fn``: regression, the MSE) over tasks and steps (detached)."""
    rule = ScalarLR(lr)
    phis, losses, accs = [], [], []
    for t in range(x.shape[0]):
        fast = {k: v.detach().requires_grad_() for k, v in theta.items()}
        for s in range(steps):
            idx = batch_indices(x.shape[1], batch, perms, s)
            xb, yb = (x[t], y[t]) if idx is None else (x[t, idx[t]], y[t, idx[t]])
            out = functional_call(net, fast, (xb,))
            loss = loss_fn(out, yb)
            grads = torch.autograd.grad(loss, tuple(fast.values()))
            fast = {k: v.detach().requires_grad_() for k, v in rule(fast, dict(zip(fast, grads)), s).items()}
            losses.append(loss.detach())
            accs.append(metric_fn(out.detach(), yb))
        phis.append({k: v.detach() for k, v in fast.items()})
    stacked = {k: torch.stack([p[k] for p in phis]) for k in theta}
    return stacked, torch.stack(losses).mean(), torch.stack(accs).mean()


def inner_sgd_grouped(net: nn.Module, theta: Params, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int,
                      batch: Optional[int], perms: Optional[torch.Tensor], loss_fn: LossFn = cross_entropy,
                      metric_fn: LossFn = accuracy):
    """:func:`inner_sgd` for every task at once: each task's weights are the groups of grouped convolutions
    (Conv4's ``forward_tasks``) and one ``autograd.grad`` of the summed task losses gives each task its own
    gradient.  Same results."""
    rule = ScalarLR(lr)
    t = x.shape[0]
    fast = {k: v.detach().unsqueeze(0).expand(t, *v.shape).clone().requires_grad_() for k, v in theta.items()}
    losses, accs = [], []
    for s in range(steps):
        idx = batch_indices(x.shape[1], batch, perms, s)
        if idx is None:
            xb, yb = x, y
        else:
            rows = torch.arange(t, device=x.device).unsqueeze(1)
            xb, yb = x[rows, idx], y[rows, idx]
        out = grouped_forward(net, fast, xb)
        per_task = torch.stack([loss_fn(out[i], yb[i]) for i in range(t)])
        grads = torch.autograd.grad(per_task.sum(), tuple(fast.values()))
        fast = {k: v.detach().requires_grad_() for k, v in rule(fast, dict(zip(fast, grads)), s).items()}
        losses.append(per_task.detach())
        accs.append(torch.stack([metric_fn(out[i].detach(), yb[i]) for i in range(t)]))
    return {k: v.detach() for k, v in fast.items()}, torch.stack(losses).mean(), torch.stack(accs).mean()


class Reptile(GradientLearner):
    """backbone + linear head (n_way outputs).  Training: :meth:`outer_step` (module docstring); test time:
    ``eval_inner_steps`` SGD steps at ``inner_lr`` on the support set.

    batch_tasks (``device.batch_tasks``): ``groups`` (or ``auto`` choosing it) runs a batch's inner loops as
    grouped convolutions; anything else, task after task (vmap has nothing to offer a first-order loop).
    """

    eval_settings: ClassVar[tuple[str, ...]] = ("eval_inner_steps", "inner_lr", "transductive")

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_lr: float = 0.1,
                 inner_steps: int = 5, eval_inner_steps: int = 50, inner_batch: Optional[int] = 10,
                 outer_step_size: float = 1.0, outer_step_size_final: float = 0.0, transductive: bool = False,
                 batch_tasks: str = "off") -> None:
        super().__init__(backbone, n_way, feature_dim, inner_steps, eval_inner_steps, batch_tasks)
        if inner_batch is not None and inner_batch < 1:
            raise UserError(f"algo.inner_batch={inner_batch} must be >= 1, or null for the whole task")
        self.inner_lr = inner_lr
        self.inner_batch = inner_batch
        self.outer_step_size = outer_step_size
        self.outer_step_size_final = outer_step_size_final
        self.transductive = transductive

    def update_rule(self) -> UpdateRule:
        return ScalarLR(self.inner_lr)

    def second_order(self) -> bool:
        return False

    # ------------------------------------------------------------------ training
    def current_step_size(self) -> float:
        """eps at this step (``set_progress`` is called by the engine before every step)."""
        return linear_anneal(self.outer_step_size, self.outer_step_size_final, self.progress_step,
                             self.progress_total)

    def meta_loss(self, batch: Episode):
        raise NotImplementedError("Reptile's outer update is its own (outer_step): it has no meta-loss to "
                                  "differentiate")

    def outer_step(self, batch: Episode, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        x = torch.cat([batch.support_x, batch.query_x], 1)  # the task's whole pool (module docstring)
        y = torch.cat([batch.support_y, batch.query_y], 1)
        n = x.shape[1]
        perms = None
        if self.inner_batch is not None and self.inner_batch < n:
            perms = torch.rand(x.shape[0], n).argsort(1).to(x.device)  # global generator (restored on resume)
        theta = {k: v.detach() for k, v in self.meta_params().items()}
        inner = inner_sgd_grouped if self.task_mode(batch) == "groups" else inner_sgd
        with torch.enable_grad():
            phis, loss, acc = inner(self.net, theta, x, y, self.inner_lr, self.inner_steps, self.inner_batch, perms,
                                    loss_fn=self.loss_fn, metric_fn=self.metric_fn)
        eps = self.current_step_size()
        params = self.meta_params()
        with torch.no_grad():
            for k, p in reptile_update(theta, phis, eps).items():
                params[k].copy_(p)
        return {"loss": float(loss), self.metric_name: float(acc), "outer_step_size": eps}

    def runs_tasks_one_by_one(self, episodes: Episode) -> bool:
        return False  # its own outer step: never spread over the engine's task threads

    def execution_notes(self, task_threads: int) -> dict[str, str]:
        how = {"groups": "all tasks at once as grouped convolutions"}.get(self.batch_tasks, "one task after another")
        if self.batch_tasks == "auto":
            how = "grouped convolutions on CPU for small tasks of a Conv4, else one task after another"
        return {"task execution": f"Reptile's own outer step: {how}"}

    # ------------------------------------------------------------------ test time
    def predict(self, episodes: Episode) -> torch.Tensor:
        if self.transductive:
            return super().predict(episodes)  # the queries of a task normalised together
        self.check_n_way(episodes.n_way)
        params = {k: v.detach().requires_grad_() for k, v in self.meta_params().items()}
        out = []
        for t in range(episodes.n_tasks):
            ep = episodes.task(t)
            with torch.enable_grad():
                fast = adapt(self.net, params, ep.support_x, ep.support_y, self.update_rule(), self.eval_inner_steps,
                             create_graph=False, loss_fn=self.loss_fn)
            out.append(each_with_support(self.net, {k: v.detach() for k, v in fast.items()}, ep.support_x,
                                         ep.query_x))
        return torch.stack(out)


def each_with_support(net: nn.Module, params: Params, xs: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Non-transductive scores: each query image in a batch with the support set alone (batch norm's
    statistics from those S + 1 images), as the paper's code does; (Q, n_out)."""
    with torch.no_grad():
        def one(xi: torch.Tensor) -> torch.Tensor:
            return functional_call(net, params, (torch.cat([xs, xi.unsqueeze(0)]),))[-1]

        return vmap(one)(xq)
