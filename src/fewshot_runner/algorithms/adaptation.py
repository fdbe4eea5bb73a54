"""Functional inner-loop adaptation shared by the gradient-based learners (MAML, FOMAML, and the
Meta-SGD / ANIL / MAML++ family that lands on it).

Pure functions over a parameter dict, with the **update rule as a parameter**:

* :class:`ScalarLR`: ``p - lr * g`` (MAML);
* :class:`PerParameterLR`: a learned rate tensor of each parameter's shape, ``p - a * g`` (Meta-SGD);
* :class:`PerStepLR`: a learned rate per parameter tensor and inner step, ``p - a[step] * g`` (MAML++'s
  per-layer per-step rates);
* ``keys``: which parameters adapt at all (ANIL: the head's only; the rest pass through unchanged
  and are still differentiated by the outer loss);
* ``step_params`` (batched and grouped executions): parameters of inner step k that do not adapt, put
  over the others for that step (MAML++'s per-step batch-norm weights); ``every_step``: the query
  outputs after every inner step (MAML++'s multi-step loss), not only after the last.

Three executions of the same math, chosen per batch by :mod:`fewshot_runner.algorithms.gradient`:
the per-task loop (:func:`adapt`), all tasks under ``torch.func.vmap`` (:func:`adapt_batched`) and
all tasks as the groups of grouped convolutions (:func:`adapt_grouped`).  Adaptation is functional
(``torch.func.functional_call``): the meta-parameters are never modified in place, so the outer
gradient flows through the inner steps exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call

from fewshot_runner.algorithms.base import cross_entropy

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepParams = Callable[[int], Params]  # inner step (0-based) -> the parameters of that step that do not adapt


class UpdateRule(Protocol):
    """One inner step: the adapted parameters from ``params`` and their support-loss ``grads`` (same
    keys), at inner step ``step`` (0-based).  Must be out of place (no in-place ops on ``params``)."""

    def __call__(self, params: Params, grads: Params, step: int) -> Params: ...


@dataclass(frozen=True)
class ScalarLR:
    """Plain SGD with one rate: ``p - lr * g`` (MAML)."""

    lr: float

    def __call__(self, params: Params, grads: Params, step: int) -> Params:
        return {k: p - self.lr * grads[k] for k, p in params.items()}


@dataclass(frozen=True)
class PerParameterLR:
    """A rate tensor per parameter, broadcast against it (Meta-SGD: the rates have each parameter's
    shape and are meta-learned): ``p - lr[k] * g``."""

    lrs: Mapping[str, torch.Tensor]

    def __call__(self, params: Params, grads: Params, step: int) -> Params:
        return {k: p - self.lrs[k] * grads[k] for k, p in params.items()}


@dataclass(frozen=True)
class PerStepLR:
    """A rate per parameter tensor and inner step (MAML++'s LSLR): ``lrs[k]`` has one entry per step,
    ``p - lrs[k][step] * g``."""

    lrs: Mapping[str, torch.Tensor]

    def __call__(self, params: Params, grads: Params, step: int) -> Params:
        return {k: p - self.lrs[k][step] * grads[k] for k, p in params.items()}


def as_rule(rule_or_lr: UpdateRule | float) -> UpdateRule:
    """A number is a :class:`ScalarLR`; an update rule is itself."""
    return ScalarLR(float(rule_or_lr)) if isinstance(rule_or_lr, (int, float)) else rule_or_lr


def sgd_update(params: Params, grads: Sequence[torch.Tensor], lr: float) -> Params:
    """One plain SGD step, out of place: {k: p - lr * g} (``grads`` in ``params``' order)."""
    return ScalarLR(lr)(params, dict(zip(params, grads)), 0)


def _subset(params: Params, keys: Sequence[str] | None) -> Params:
    return params if keys is None else {k: params[k] for k in keys}


def adapt(net: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, rule: UpdateRule | float, steps: int,
          create_graph: bool, keys: Sequence[str] | None = None, loss_fn: LossFn = cross_entropy) -> Params:
    """``steps`` inner steps of ``rule`` on the support loss of one task, from ``params``.

    create_graph=True keeps the graph of the inner gradients (second-order); False treats them as
    constants (first-order, and evaluation).  ``keys``: the parameters that adapt (None: all).
    """
    rule = as_rule(rule)
    for step in range(steps):
        fast = _subset(params, keys)
        loss = loss_fn(functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss, tuple(fast.values()), create_graph=create_graph)
        params = {**params, **rule(fast, dict(zip(fast, grads)), step)}
    return params


def adapt_batched(net: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor,
                  rule: UpdateRule | float, steps: int, create_graph: bool, keys: Sequence[str] | None = None,
                  loss_fn: LossFn = cross_entropy, step_params: StepParams | None = None,
                  every_step: bool = False) -> torch.Tensor:
    """:func:`adapt` for every task at once: ``torch.func.vmap`` over the leading task dimension of
    x (T, S, ...), y (T, S) and xq (T, Q, ...), with ``torch.func.grad`` inner steps; returns the
    query outputs (T, Q, ...) of the adapted nets.

    The meta-parameters are shared (not batched); the outer gradient flows through vmap and the
    inner gradients by ordinary autograd (create_graph=False detaches the inner gradients: first
    order).  Batch norm inside must be written from primitives (:mod:`fewshot_runner.backbones.norm`).

    ``step_params(k)``: parameters (not adapted, not in ``keys``) put over ``params`` from inner step k on,
    so step k's support forward and the query forward after it use them.  ``every_step``: the query
    outputs after each inner step, (T, steps, Q, ...).
    """
    from torch.func import grad, vmap

    rule = as_rule(rule)

    def support_loss(fast: Params, rest: Params, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(net, {**rest, **fast}, (xs,)), ys)

    def one_task(p: Params, xs: torch.Tensor, ys: torch.Tensor, xqs: torch.Tensor) -> torch.Tensor:
        outs = []
        for step in range(steps):
            if step_params is not None:
                p = {**p, **step_params(step)}
            fast = _subset(p, keys)
            g = grad(support_loss)(fast, p, xs, ys)
            if not create_graph:
                g = {k: v.detach() for k, v in g.items()}
            p = {**p, **rule(fast, g, step)}
            if every_step:
                outs.append(functional_call(net, p, (xqs,)))
        return torch.stack(outs) if every_step else functional_call(net, p, (xqs,))

    return vmap(one_task, in_dims=(None, 0, 0, 0), randomness="same")(params, x, y, xq)


def grouped_forward(net: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``net`` = Sequential(backbone with ``forward_tasks``, Linear head) on T tasks at once, each with
    its own weights: params (T, *shape), x (T, N, ...) -> outputs (T, N, n_out)."""
    backbone = net[0]
    feats = backbone.forward_tasks(x, {k[2:]: v for k, v in params.items() if k.startswith("0.")})
    w, b = params["1.weight"], params.get("1.bias")
    out = torch.bmm(feats, w.transpose(1, 2))
    return out + b.unsqueeze(1) if b is not None else out


def adapt_grouped(net: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor,
                  rule: UpdateRule | float, steps: int, create_graph: bool, keys: Sequence[str] | None = None,
                  loss_fn: LossFn = cross_entropy, step_params: StepParams | None = None,
                  every_step: bool = False) -> torch.Tensor:
    """:func:`adapt_batched` without torch.func: every task gets its own copy of the weights (a
    (T, ...) expand of the meta-parameters), the backbone runs the tasks as the groups of grouped
    convolutions (``forward_tasks``), and one ``autograd.grad`` of the summed support losses gives each
    task its own inner gradient (task t's loss depends on task t's copy only).  Plain autograd, so the
    fused batch-norm op (exact double backward) applies, and none of vmap's per-op overhead: the MAML
    Omniglot net's 32-task step on 2 CPU cores (docs/speed.md).  Returns the query outputs (T, Q, ...).

    ``loss_fn`` must be a mean over the task's examples (its value times T is the sum over tasks).
    ``step_params``, ``every_step``: as in :func:`adapt_batched` (step k's parameters shared by every task).
    """
    rule = as_rule(rule)
    t = y.shape[0]
    fast = {k: v.unsqueeze(0).expand(t, *v.shape) for k, v in params.items()}
    outs = []
    for step in range(steps):
        if step_params is not None:
            fast = {**fast, **{k: v.unsqueeze(0).expand(t, *v.shape) for k, v in step_params(step).items()}}
        out = grouped_forward(net, fast, x)
        loss = loss_fn(out.flatten(0, 1), y.flatten(0, 1)) * t  # = sum over tasks of each task's mean loss
        adapted = _subset(fast, keys)
        grads = torch.autograd.grad(loss, tuple(adapted.values()), create_graph=create_graph)
        fast = {**fast, **rule(adapted, dict(zip(adapted, grads)), step)}
        if every_step:
            outs.append(grouped_forward(net, fast, xq))
    return torch.stack(outs, 1) if every_step else grouped_forward(net, fast, xq)
