"""The shell every gradient-based learner shares: a backbone + linear head adapted per task by the
functional inner loop of :mod:`fewshot_runner.algorithms.adaptation`, and the task-execution policy
(one task after another, all under vmap, or all as grouped convolutions) in one place.

A learner of this family subclasses :class:`GradientLearner` and says only what is its own: its
update rule (:meth:`~GradientLearner.update_rule`), which parameters adapt
(:meth:`~GradientLearner.adapted_keys`), and whether the inner gradients are differentiated
(:meth:`~GradientLearner.second_order`).  Every execution computes the same meta-gradient
(tests/algorithms/test_maml.py checks them against the loop in float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from fewshot_runner.algorithms.adaptation import Params, UpdateRule, adapt, adapt_batched, adapt_grouped
from fewshot_runner.algorithms.base import MetaLearner, accuracy, cross_entropy, mse
from fewshot_runner.backbones.norm import make_transform_safe
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

# device.batch_tasks: off (task after task), on (torch.func.vmap over the tasks), groups (the tasks as
# the groups of grouped convolutions, backbones with ``forward_tasks``: Conv4), auto (see task_mode)
BATCH_TASKS = ("off", "on", "groups", "auto")

# device.batch_tasks=auto on CPU: the tasks at once pay for tasks this small (32-task steps, 2 cores,
# docs/speed.md): strided Omniglot net, 10 images per task: groups 166, vmap 205, loop 258 ms;
# 20: 221 / 293 / 299; 80: 558 / 879 / 507.  Max-pool net: 10 images: groups 306, loop 359; 80:
# 1,143 vs 877 (vmap is slower than the loop there at every size).
CPU_BATCHED_MAX_IMAGES = 32


def task_mode(batch_tasks: str, backbone: nn.Module, episodes: Episode) -> str:
    """How a batch's tasks run: ``"off"`` (one by one), ``"on"`` (vmap) or ``"groups"`` (grouped
    convolutions).  ``auto``: vmap for CUDA tensors; on CPU, for small tasks (at most
    ``CPU_BATCHED_MAX_IMAGES`` support + query images: the MAML paper's Omniglot setting) ``groups`` on a
    backbone with ``forward_tasks``, vmap on one without max-pool blocks, else the loop (with 15 queries per
    class the loop, with the fused kernels and task threads, is faster: docs/speed.md).

    What it reads of the backbone is its declared contract (backbones/__init__.py): ``forward_tasks``
    and ``has_max_pool``.
    """
    if batch_tasks != "auto":
        return batch_tasks
    if episodes.support_x.is_cuda:
        return "on"
    per_task = episodes.support_x.shape[1] + episodes.query_x.shape[1]
    if per_task > CPU_BATCHED_MAX_IMAGES:
        return "off"
    return cpu_small_task_mode(backbone)


def cpu_small_task_mode(backbone: nn.Module) -> str:
    """``auto``'s choice on CPU for small tasks: grouped convolutions where the backbone has
    ``forward_tasks``, else vmap unless it has max-pool blocks (then the loop)."""
    if hasattr(backbone, "forward_tasks"):
        return "groups"
    return "off" if getattr(backbone, "has_max_pool", False) else "on"


def disable_running_stats(module: nn.Module) -> None:
    """Make every batch norm use batch statistics in train and eval mode (as in MAML)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


class GradientLearner(MetaLearner):
    """``backbone`` + linear head (``n_way`` outputs) as ``self.net``, adapted per task by ``inner_steps``
    inner steps in training and ``eval_inner_steps`` at test time.

    Batch norm uses the batch statistics of the data it sees (support in the inner loop, query for the
    outer loss), in training and at test time, as in MAML.  ``batch_tasks``: see :func:`task_mode`.
    """

    independent_tasks: ClassVar[bool] = True  # per-task losses share only the weights: chunks, task threads
    eval_settings: ClassVar[tuple[str, ...]] = ("eval_inner_steps", "inner_lr")
    task_kinds: ClassVar[tuple[str, ...]] = ("classification", "regression")  # (loss_fn, metric_fn: below)

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_steps: int, eval_inner_steps: int,
                 batch_tasks: str = "off") -> None:
        super().__init__()
        if inner_steps < 1 or eval_inner_steps < 1:
            raise UserError("algo.inner_steps and algo.eval_inner_steps must be >= 1")
        if batch_tasks not in BATCH_TASKS:
            raise UserError(f"batch_tasks={batch_tasks!r} is not one of {', '.join(BATCH_TASKS)}; use device.batch_tasks=auto")
        if batch_tasks == "groups" and not hasattr(backbone, "forward_tasks"):
            raise UserError(f"device.batch_tasks=groups needs a Conv4 backbone (this one is "
                            f"{type(backbone).__name__}); use device.batch_tasks=on (vmap) or auto")
        self.net = nn.Sequential(backbone, nn.Linear(feature_dim, n_way))
        disable_running_stats(self.net)
        make_transform_safe(self.net)  # batch norm from primitives under vmap (correct second order)
        self.batch_tasks = batch_tasks
        self.n_way = n_way
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps

    # ------------------------------------------------------------------ what a subclass says
    def update_rule(self) -> UpdateRule:
        """The inner update (adaptation.ScalarLR, PerParameterLR, PerStepLR, or one of its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define update_rule()")

    def adapted_keys(self) -> Sequence[str] | None:
        """The names (in ``self.net``) of the parameters the inner loop adapts; None: all of them."""
        return None

    def second_order(self) -> bool:
        """Whether training differentiates through the inner gradients (False: first order)."""
        return True

    # ------------------------------------------------------------------ the task kind (set_task_kind)
    @property
    def loss_fn(self):
        """The inner and outer loss: cross-entropy of logits (..., n_way) against class labels, or for
        regression the MSE of outputs (..., 1) against float targets (...)."""
        return mse if self.task_kind == "regression" else cross_entropy

    @property
    def metric_name(self) -> str:
        """The name of :attr:`metric_fn`'s value in the metrics: ``"acc"``, or ``"mse"`` for regression."""
        return "mse" if self.task_kind == "regression" else "acc"

    @property
    def metric_fn(self):
        """The training metric of outputs and targets (a scalar): the accuracy, or for regression the MSE."""
        return mse if self.task_kind == "regression" else accuracy

    # ------------------------------------------------------------------ shared machinery
    def meta_params(self) -> Params:
        return dict(self.net.named_parameters())

    def task_mode(self, episodes: Episode) -> str:
        return task_mode(self.batch_tasks, self.net[0], episodes)

    def runs_tasks_one_by_one(self, episodes: Episode) -> bool:
        return self.task_mode(episodes) == "off"

    def execution_notes(self, task_threads: int) -> dict[str, str]:
        loop = f"the per-task loop in {task_threads} task threads" if task_threads > 1 else "the per-task loop"
        modes = {"off": loop, "on": "all tasks at once under torch.func.vmap",
                 "groups": "all tasks at once as grouped convolutions"}
        if self.batch_tasks != "auto":
            return {"task execution": f"device.batch_tasks={self.batch_tasks}: {modes[self.batch_tasks]}"}
        small = {"groups": "grouped convolutions", "on": "vmap", "off": "the per-task loop"}[
            cpu_small_task_mode(self.net[0])]
        return {"task execution": f"auto: on CPU {small} for tasks of <= {CPU_BATCHED_MAX_IMAGES} images, "
                                  f"else {loop}; vmap on CUDA (chosen per batch)"}

    def _adapt_all(self, mode: str, params: Params, episodes: Episode, steps: int, create_graph: bool):
        adapt_fn = adapt_grouped if mode == "groups" else adapt_batched
        return adapt_fn(self.net, params, episodes.support_x, episodes.support_y, episodes.query_x,
                        self.update_rule(), steps, create_graph=create_graph, keys=self.adapted_keys(),
                        loss_fn=self.loss_fn)

    def task_loss(self, ep: Episode, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and logits of one task after adaptation from ``params``."""
        fast = adapt(self.net, params, ep.support_x, ep.support_y, self.update_rule(), self.inner_steps,
                     create_graph=self.second_order(), keys=self.adapted_keys(), loss_fn=self.loss_fn)
        logits = functional_call(self.net, fast, (ep.query_x,))
        return self.loss_fn(logits, ep.query_y), logits

    def meta_loss(self, episodes: Episode):
        params = self.meta_params()
        mode = self.task_mode(episodes)
        if mode != "off":
            logits = self._adapt_all(mode, params, episodes, self.inner_steps, create_graph=self.second_order())
            loss = self.loss_fn(logits, episodes.query_y)  # the mean over tasks of equal-size query sets
            acc = self.metric_fn(logits.detach(), episodes.query_y)
            return loss, {"loss": loss.detach(), self.metric_name: acc}
        losses, accs = [], []
        for t in range(episodes.n_tasks):
            ep = episodes.task(t)
            loss, logits = self.task_loss(ep, params)
            losses.append(loss)
            accs.append(self.metric_fn(logits.detach(), ep.query_y))
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.detach(), self.metric_name: torch.stack(accs).mean()}

    def predict(self, episodes: Episode) -> torch.Tensor:
        self.check_n_way(episodes.n_way)
        mode = self.task_mode(episodes)
        if mode == "on":  # torch.func.grad needs no enable_grad; no outer graph is built
            params = {k: v.detach() for k, v in self.meta_params().items()}
            return self._adapt_all(mode, params, episodes, self.eval_inner_steps, create_graph=False).detach()
        params = {k: v.detach().requires_grad_() for k, v in self.meta_params().items()}
        if mode == "groups":
            with torch.enable_grad():
                return self._adapt_all(mode, params, episodes, self.eval_inner_steps, create_graph=False).detach()
        out = []
        rule, keys = self.update_rule(), self.adapted_keys()
        for t in range(episodes.n_tasks):
            ep = episodes.task(t)
            with torch.enable_grad():
                fast = adapt(self.net, params, ep.support_x, ep.support_y, rule, self.eval_inner_steps,
                             create_graph=False, keys=keys, loss_fn=self.loss_fn)
            with torch.no_grad():
                out.append(functional_call(self.net, {k: v.detach() for k, v in fast.items()}, (ep.query_x,)))
        return torch.stack(out)

    def adapted_predict(self, episodes: Episode, steps: int) -> torch.Tensor:
        """:meth:`predict` after ``steps`` inner steps instead of ``eval_inner_steps`` (0: the meta-learned
        initialisation itself), for pictures of adaptation (plots_regression.py); outputs (T, Q, n_way).
        Called under ``torch.no_grad()`` like ``predict``."""
        if steps < 0:
            raise UserError(f"adapted_predict: steps={steps} must be >= 0")
        kept = self.eval_inner_steps
        self.eval_inner_steps = int(steps)
        try:
            return self.predict(episodes)
        finally:
            self.eval_inner_steps = kept

    def check_n_way(self, n_way: int) -> None:
        if n_way != self.n_way:
            raise UserError(
                f"this {type(self).__name__} model has a {self.n_way}-way head and cannot be tested {n_way}-way; "
                f"use data.n_way={self.n_way} (or train a {n_way}-way model)"
            )
