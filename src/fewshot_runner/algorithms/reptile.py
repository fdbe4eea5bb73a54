"""Reptile (Nichol, Achiam & Schulman, 2018): a first-order meta-learner whose outer update is not a
gradient step.  Each task of a meta-batch: ``inner_steps`` steps of the inner optimizer from theta give
phi_task; then theta <- theta + eps * mean_tasks(phi_task - theta), eps annealed linearly from
``outer_step_size`` to ``outer_step_size_final`` over training (the paper: 1 -> 0).

The inner optimizer (``inner_optimizer``): SGD at ``inner_lr``, or Adam (Kingma & Ba 2015, Algorithm 1;
``inner_beta1``, ``inner_beta2``, ``inner_eps``), the paper's setting (lr 1e-3, its code's
``AdamOptimizer(beta1=0)``); ``inner_lr`` null: the optimizer's own rate (SGD 0.1, Adam 1e-3).  Its code resets
only the weights after a task, so Adam's moments and step count carry over from task to task and meta-step to
meta-step, and every test task starts from them (restored after it); ``inner_state=carry`` does the same
(buffers, in the checkpoint), ``reset`` starts every task from zero moments.

The math is in pure functions (:class:`InnerSGD` / :class:`InnerAdam`: one step; :func:`inner_loop`,
:func:`inner_grouped`, :func:`inner_vmapped`: task by task or all at once; :func:`reptile_update`); the
class is a shell with its own ``outer_step`` (the engine's optimizer is not used).

Data: Reptile trains on the task's own data, so a training task's support and query images form one
pool (``train_n_shot + train_n_query`` images per class; the paper's Omniglot setting is 10 per class).
Each inner step takes ``inner_batch`` images of it, walking one random permutation per task and step of
training (torch's global generator, so a resumed run draws the same); ``inner_batch`` null: the whole pool.

Test time: ``eval_inner_steps`` steps of the inner optimizer on the whole support set, then the queries.
Batch norm uses batch statistics throughout; ``transductive`` chooses how the queries are normalised:
all at once (True, the paper's reported setting), or each query image with the support set alone (False,
the default: no query sees another).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fewshot_runner.algorithms.adaptation import LossFn, Params, ScalarLR, UpdateRule, adapt, grouped_forward
from fewshot_runner.algorithms.base import accuracy, cross_entropy
from fewshot_runner.algorithms.gradient import CPU_BATCHED_MAX_IMAGES, GradientLearner, cpu_small_task_mode
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

INNER_OPTIMIZERS = ("sgd", "adam")
INNER_STATES = ("carry", "reset")
DEFAULT_INNER_LR = {"sgd": 0.1, "adam": 1e-3}


def linear_anneal(start: float, final: float, step: int, total: int) -> float:
    """The outer step size at ``step`` (0-based) of ``total``: ``start`` at step 0, moving linearly towards
    ``final`` (reached at ``total``), as the paper's code (frac_done = step / total)."""
    frac = step / total if total > 0 else 0.0
    return (1.0 - frac) * start + frac * final


def reptile_update(theta: Params, phis: Params, eps: float) -> Params:
    """theta + eps * mean_tasks(phi - theta); ``phis`` holds each parameter's adapted copies (T, *shape)."""
    return {k: p + eps * (phis[k] - p.unsqueeze(0)).mean(0) for k, p in theta.items()}


# ---------------------------------------------------------------------- the inner optimizers (one step, pure)
class AdamState(NamedTuple):
    """Adam's state: first and second moments (each parameter's shape, or (T, *shape) for T tasks at once)
    and the number of steps taken."""

    m: Params
    v: Params
    step: int


@dataclass(frozen=True)
class InnerSGD:
    """``p - lr * g``; no state."""

    lr: float

    def init(self, params: Params) -> None:
        return None

    def __call__(self, params: Params, grads: Params, state: None) -> tuple[Params, None]:
        return ScalarLR(self.lr)(params, grads, 0), None


@dataclass(frozen=True)
class InnerAdam:
    """Adam, out of place: step t = state.step + 1, m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).  (The paper's TensorFlow Adam adds eps to
    sqrt(v) before the bias correction: the same update up to eps's size.)"""

    lr: float
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8

    def init(self, params: Params) -> AdamState:
        return AdamState({k: torch.zeros_like(p) for k, p in params.items()},
                         {k: torch.zeros_like(p) for k, p in params.items()}, 0)

    def __call__(self, params: Params, grads: Params, state: AdamState) -> tuple[Params, AdamState]:
        b1, b2, t = self.beta1, self.beta2, state.step + 1
        m = {k: b1 * state.m[k] + (1.0 - b1) * g for k, g in grads.items()}
        v = {k: b2 * state.v[k] + (1.0 - b2) * g * g for k, g in grads.items()}
        c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        new = {k: p - self.lr * (m[k] / c1) / ((v[k] / c2).sqrt() + self.eps) for k, p in params.items()}
        return new, AdamState(m, v, t)


def expand_state(state, t: int):
    """A state for one task repeated for ``t`` tasks at once ((T, *shape) moments); None stays None."""
    rep = lambda d: {k: v.unsqueeze(0).expand(t, *v.shape) for k, v in d.items()}  # noqa: E731
    return None if state is None else AdamState(rep(state.m), rep(state.v), state.step)


# ---------------------------------------------------------------------- the inner loops
def batch_indices(n_images: int, batch: Optional[int], perms: Optional[torch.Tensor], step: int):
    """Which pool images inner step ``step`` uses: (T, batch) positions cycling through each task's
    permutation ``perms`` (T, n_images); None: the whole pool (``batch`` null or >= the pool)."""
    if perms is None:
        return None
    pos = (step * batch + torch.arange(batch, device=perms.device)) % n_images
    return perms[:, pos]


def inner_loop(net: nn.Module, theta: Params, x: torch.Tensor, y: torch.Tensor, opt, steps: int,
               batch: Optional[int], perms: Optional[torch.Tensor], state=None, carry: bool = False,
               loss_fn: LossFn = cross_entropy, metric_fn: LossFn = accuracy):
    """Each task's ``steps`` steps of ``opt`` (:class:`InnerSGD` / :class:`InnerAdam`) from ``theta`` on its
    pool x (T, N, ...), y (T, N), one task after another.  Every task starts from the optimizer state
    ``state`` (None: ``opt.init``), or with ``carry`` from the state the task before left.

    Returns the adapted weights stacked over tasks (T, *shape), the mean batch loss and metric
    (``metric_fn``: accuracy; regression, the MSE) over tasks and steps (detached), and the last task's
    final optimizer state."""
    start = opt.init(theta) if state is None else state
    phis, losses, accs, st = [], [], [], start
    for t in range(x.shape[0]):
        fast = {k: v.detach().requires_grad_() for k, v in theta.items()}
        st = st if carry else start
        for s in range(steps):
            idx = batch_indices(x.shape[1], batch, perms, s)
            xb, yb = (x[t], y[t]) if idx is None else (x[t, idx[t]], y[t, idx[t]])
            out = functional_call(net, fast, (xb,))
            loss = loss_fn(out, yb)
            grads = torch.autograd.grad(loss, tuple(fast.values()))
            fast, st = opt(fast, dict(zip(fast, grads)), st)
            fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
            losses.append(loss.detach())
            accs.append(metric_fn(out.detach(), yb))
        phis.append({k: v.detach() for k, v in fast.items()})
    stacked = {k: torch.stack([p[k] for p in phis]) for k in theta}
    return stacked, torch.stack(losses).mean(), torch.stack(accs).mean(), st


def inner_grouped(net: nn.Module, theta: Params, x: torch.Tensor, y: torch.Tensor, opt, steps: int,
                  batch: Optional[int], perms: Optional[torch.Tensor], state=None, loss_fn: LossFn = cross_entropy,
                  metric_fn: LossFn = accuracy):
    """:func:`inner_loop` for every task at once (no ``carry``: the tasks run side by side): each task's
    weights are the groups of grouped convolutions (Conv4's ``forward_tasks``) and one ``autograd.grad`` of
    the summed task losses gives each task its own gradient; every task starts from ``state`` (None:
    ``opt.init``).  Same results; returns the adapted weights (T, *shape), the mean loss and metric."""
    t = x.shape[0]
    fast = {k: v.detach().unsqueeze(0).expand(t, *v.shape).clone().requires_grad_() for k, v in theta.items()}
    st = opt.init(fast) if state is None else expand_state(state, t)
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
        fast, st = opt(fast, dict(zip(fast, grads)), st)
        fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
        losses.append(per_task.detach())
        accs.append(torch.stack([metric_fn(out[i].detach(), yb[i]) for i in range(t)]))
    return {k: v.detach() for k, v in fast.items()}, torch.stack(losses).mean(), torch.stack(accs).mean()


def inner_vmapped(net: nn.Module, theta: Params, x: torch.Tensor, y: torch.Tensor, opt, steps: int, state=None,
                  loss_fn: LossFn = cross_entropy) -> Params:
    """Test-time fine-tuning of every task at once under ``torch.func.vmap`` (the whole support set x (T, S, ...),
    y (T, S) each step; every task from ``state``, None: ``opt.init``): the adapted weights (T, *shape)."""
    start = opt.init(theta) if state is None else state

    def one(xs: torch.Tensor, ys: torch.Tensor) -> Params:
        p, st = theta, start
        for _ in range(steps):
            g = grad(lambda q: loss_fn(functional_call(net, q, (xs,)), ys))(p)
            p, st = opt(p, g, st)
        return p

    return vmap(one, randomness="same")(x, y)


class CarriedState(nn.Module):
    """The inner Adam's state kept from task to task (``inner_state=carry``), as buffers, so that the learner's
    ``state_dict`` (checkpoints, resume) holds it: ``m_NAME`` and ``v_NAME`` of each parameter's shape (NAME: the
    parameter's name with ``_`` for ``.``) and ``step`` (an int64 scalar)."""

    def __init__(self, params: Params) -> None:
        super().__init__()
        self.names = {k: k.replace(".", "_") for k in params}
        if len(set(self.names.values())) != len(self.names):
            raise ValueError(f"parameter names collide once '.' is written '_': {sorted(self.names)}")
        for k, p in params.items():
            self.register_buffer("m_" + self.names[k], torch.zeros_like(p.detach()))
            self.register_buffer("v_" + self.names[k], torch.zeros_like(p.detach()))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def get(self) -> AdamState:
        return AdamState({k: getattr(self, "m_" + n) for k, n in self.names.items()},
                         {k: getattr(self, "v_" + n) for k, n in self.names.items()}, int(self.step))

    @torch.no_grad()
    def put(self, state: AdamState) -> None:
        for k, n in self.names.items():
            getattr(self, "m_" + n).copy_(state.m[k])
            getattr(self, "v_" + n).copy_(state.v[k])
        self.step.fill_(state.step)


class Reptile(GradientLearner):
    """backbone + linear head (n_way outputs).  Training: :meth:`outer_step` (module docstring); test time:
    ``eval_inner_steps`` steps of the inner optimizer on the support set.

    batch_tasks (``device.batch_tasks``), training: ``groups`` runs a batch's inner loops as grouped
    convolutions, ``auto`` does where each inner step is small (:meth:`train_mode`); anything else, task after
    task (vmap has nothing to offer a first-order loop).  A carried Adam state runs the tasks in order.
    """

    eval_settings: ClassVar[tuple[str, ...]] = ("eval_inner_steps", "inner_lr", "transductive")
    anneals_over_steps: ClassVar[bool] = True  # the outer step size falls linearly to its final value at train.steps

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_lr: Optional[float] = None,
                 inner_steps: int = 5, eval_inner_steps: int = 50, inner_batch: Optional[int] = 10,
                 outer_step_size: float = 1.0, outer_step_size_final: float = 0.0, transductive: bool = False,
                 inner_optimizer: str = "sgd", inner_beta1: float = 0.0, inner_beta2: float = 0.999,
                 inner_eps: float = 1e-8, inner_state: str = "carry", batch_tasks: str = "off") -> None:
        super().__init__(backbone, n_way, feature_dim, inner_steps, eval_inner_steps, batch_tasks)
        if inner_batch is not None and inner_batch < 1:
            raise UserError(f"algo.inner_batch={inner_batch} must be >= 1, or null for the whole task")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise UserError(f"algo.inner_optimizer={inner_optimizer!r} is not one of {', '.join(INNER_OPTIMIZERS)}")
        if inner_state not in INNER_STATES:
            raise UserError(f"algo.inner_state={inner_state!r} is not one of {', '.join(INNER_STATES)}")
        if not (0.0 <= inner_beta1 < 1.0 and 0.0 <= inner_beta2 < 1.0) or inner_eps < 0:
            raise UserError(f"algo.inner_beta1={inner_beta1} and algo.inner_beta2={inner_beta2} must lie in [0, 1), "
                            f"algo.inner_eps={inner_eps} must be >= 0")
        carry = inner_optimizer == "adam" and inner_state == "carry"
        if carry and batch_tasks == "groups":
            raise UserError("device.batch_tasks=groups runs a batch's tasks side by side, but algo.inner_state=carry "
                            "passes the inner Adam's state from task to task; use algo.inner_state=reset or "
                            "device.batch_tasks=auto")
        self.inner_lr = DEFAULT_INNER_LR[inner_optimizer] if inner_lr is None else float(inner_lr)
        self.inner_batch = inner_batch
        self.outer_step_size = outer_step_size
        self.outer_step_size_final = outer_step_size_final
        self.transductive = transductive
        self.inner_optimizer = inner_optimizer
        self.inner_betas = (float(inner_beta1), float(inner_beta2))
        self.inner_eps = float(inner_eps)
        self.carried = CarriedState(self.meta_params()) if carry else None

    def update_rule(self) -> UpdateRule:
        return ScalarLR(self.inner_lr)  # (SGD's: the inherited test-time paths; Adam runs its own)

    def inner_opt(self):
        """The inner optimizer's step function (:class:`InnerSGD` or :class:`InnerAdam`) at ``inner_lr``."""
        if self.inner_optimizer == "adam":
            return InnerAdam(self.inner_lr, *self.inner_betas, self.inner_eps)
        return InnerSGD(self.inner_lr)

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

    def train_mode(self, batch: Episode) -> str:
        """How a training batch's inner loops run: ``"groups"`` or ``"off"`` (task after task).  ``auto``: on CPU,
        groups where one inner step takes <= ``CPU_BATCHED_MAX_IMAGES`` images per task (``inner_batch``, else the
        pool) and the backbone has ``forward_tasks``: gradient.task_mode's rule applied to one forward, not the pool
        (1-thread sizing, the paper's strided net, 5 tasks x 5 steps of 10 images: groups 0.66-0.76x the loop's
        time; whole 50-image pools: 0.9-1.3x).  On CUDA, or with a carried Adam state: the loop."""
        if self.carried is not None or self.batch_tasks in ("off", "on"):
            return "off"
        if self.batch_tasks == "groups":
            return "groups"
        if batch.support_x.is_cuda:
            return "off"
        pool = batch.support_x.shape[1] + batch.query_x.shape[1]
        per_step = pool if self.inner_batch is None else min(self.inner_batch, pool)
        if per_step > CPU_BATCHED_MAX_IMAGES:
            return "off"
        return "groups" if cpu_small_task_mode(self.net[0]) == "groups" else "off"

    def outer_step(self, batch: Episode, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        x = torch.cat([batch.support_x, batch.query_x], 1)  # the task's whole pool (module docstring)
        y = torch.cat([batch.support_y, batch.query_y], 1)
        n = x.shape[1]
        perms = None
        if self.inner_batch is not None and self.inner_batch < n:
            perms = torch.rand(x.shape[0], n).argsort(1).to(x.device)  # global generator (restored on resume)
        theta = {k: v.detach() for k, v in self.meta_params().items()}
        fns = {"loss_fn": self.loss_fn, "metric_fn": self.metric_fn}
        state = self.carried.get() if self.carried is not None else None
        with torch.enable_grad():
            if self.train_mode(batch) == "groups":
                phis, loss, acc = inner_grouped(self.net, theta, x, y, self.inner_opt(), self.inner_steps,
                                                self.inner_batch, perms, **fns)
            else:
                phis, loss, acc, state = inner_loop(self.net, theta, x, y, self.inner_opt(), self.inner_steps,
                                                    self.inner_batch, perms, state, state is not None, **fns)
        eps = self.current_step_size()
        if not bool(torch.stack([torch.isfinite(v).all() for v in phis.values()]).all()):
            # no update, no new Adam state: the engine stops or skips the step (train.on_nan)
            return {"loss": float("nan"), self.metric_name: float(acc), "outer_step_size": eps}
        if self.carried is not None:
            self.carried.put(state)
        params = self.meta_params()
        with torch.no_grad():
            for k, p in reptile_update(theta, phis, eps).items():
                params[k].copy_(p)
        return {"loss": float(loss), self.metric_name: float(acc), "outer_step_size": eps}

    def runs_tasks_one_by_one(self, episodes: Episode) -> bool:
        return False  # its own outer step: never spread over the engine's task threads

    def execution_notes(self, task_threads: int) -> dict[str, str]:
        how = {"groups": "all tasks at once as grouped convolutions",
               "auto": f"grouped convolutions on CPU where an inner step takes <= {CPU_BATCHED_MAX_IMAGES} images "
                       f"per task and the backbone is a Conv4, else one task after another"}.get(
            self.batch_tasks, "one task after another")
        if self.carried is not None:
            how = "one task after another (the inner Adam's state carries from task to task)"
        return {"task execution": f"Reptile's own outer step: {how}"}

    # ------------------------------------------------------------------ test time
    def predict(self, episodes: Episode) -> torch.Tensor:
        if self.inner_optimizer == "adam":
            return self.predict_adam(episodes)
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

    def predict_adam(self, episodes: Episode) -> torch.Tensor:
        """Adam fine-tuning of every task from the carried state (``inner_state=carry``: every task from the same
        state, which stays as it was, as the paper's code restores it after each test task) or from zero moments,
        in the test-time execution of the gradient family (task_mode: the loop, grouped convolutions or vmap);
        then the queries' outputs (T, Q, n_out), transductive or each with the support set alone."""
        self.check_n_way(episodes.n_way)
        mode = self.task_mode(episodes)
        theta = {k: v.detach() for k, v in self.meta_params().items()}
        state = self.carried.get() if self.carried is not None else None
        xs, ys, steps, opt = episodes.support_x, episodes.support_y, self.eval_inner_steps, self.inner_opt()
        if mode == "on":
            phis = inner_vmapped(self.net, theta, xs, ys, opt, steps, state, loss_fn=self.loss_fn)
        else:
            run = inner_grouped if mode == "groups" else inner_loop
            with torch.enable_grad():
                phis = run(self.net, theta, xs, ys, opt, steps, None, None, state, loss_fn=self.loss_fn,
                           metric_fn=self.metric_fn)[0]
        out = []
        for t in range(episodes.n_tasks):
            p = {k: v[t].detach() for k, v in phis.items()}
            if self.transductive:
                with torch.no_grad():
                    out.append(functional_call(self.net, p, (episodes.query_x[t],)))
            else:
                out.append(each_with_support(self.net, p, xs[t], episodes.query_x[t]))
        return torch.stack(out)


def each_with_support(net: nn.Module, params: Params, xs: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Non-transductive scores: each query image in a batch with the support set alone (batch norm's
    statistics from those S + 1 images), as the paper's code does; (Q, n_out)."""
    with torch.no_grad():
        def one(xi: torch.Tensor) -> torch.Tensor:
            return functional_call(net, params, (torch.cat([xs, xi.unsqueeze(0)]),))[-1]

        return vmap(one)(xq)
