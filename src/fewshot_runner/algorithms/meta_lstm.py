"""The LSTM meta-learner (Ravi & Larochelle, 2017, "Optimization as a model for few-shot learning").

The learner is any backbone + linear head, run functionally (``torch.func.functional_call`` over a
parameter dict, as :mod:`fewshot_runner.algorithms.adaptation`).  Its parameters theta are the cell state
of a coordinate-wise two-layer LSTM, every learner coordinate a row of one batch sharing the LSTM weights:

* layer 1, a plain ``nn.LSTMCell(4, hidden_size)`` over the preprocessed support loss and gradient
  (:func:`preprocess`, Andrychowicz et al. 2016, p = 10): inputs ``[L~_t (2), grad~_t (2)]`` per coordinate;
* layer 2, :class:`MetaLSTMCell`, whose cell state IS theta:
  ``f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F)``, ``i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I)``,
  ``theta_t = f_t * theta_{t-1} + i_t * (-grad_t)``; its initial state ``c_0`` (the learner's initial
  weights, ``self.net``'s parameters) is meta-learned.

The learner's gradients and losses are inputs only: computed at a detached theta, they carry no graph
(the paper's "we ignore the gradients of the learner's gradients"), so the meta-gradient flows through
the cell-state chain, the gates and the final query loss, never through a second derivative.

Batch norm (the paper's section 3.4): each task's learner starts with fresh running statistics (reset per
episode), the inner steps use batch statistics of the support set and accumulate running averages (momentum
``bn_momentum``); the query loss of meta-training uses batch statistics, and test time (``predict``)
normalises the queries with the running averages collected on that episode's support set
(``eval_bn=running``; ``batch``: the queries' own batch statistics, transductive).  No statistics leak
between episodes and the learner's own buffers never change.
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from fewshot_runner.algorithms.base import MetaLearner, accuracy, cross_entropy
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

Params = dict[str, torch.Tensor]
EVAL_BN = ("running", "batch")


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s preprocessing, (...,) -> (..., 2):
    ``(log|x| / p, sign x)`` where ``|x| >= e^-p``, else ``(-1, e^p x)``."""
    big = x.abs() >= math.exp(-p)
    first = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(x, -1.0))
    second = torch.where(big, torch.sign(x), x * math.exp(p))
    return torch.stack([first, second], -1)


class MetaLSTMCell(nn.Module):
    """The second layer: one unit per learner coordinate, shared weights, cell state = the learner's theta.

    ``weight_f`` / ``weight_i`` (hidden_size + 2,) act on ``[h_t, theta_{t-1}, gate_{t-1}]``; biases scalars.
    The paper's initialisation: weights U(-0.01, 0.01), forget bias U(4, 5) (f near 1: theta kept), input bias
    U(-5, -4) (i small: a small step), as the authors' code (model/lstm/meta-learner-lstm.lua).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight_f = nn.Parameter(torch.empty(hidden_size + 2))
        self.weight_i = nn.Parameter(torch.empty(hidden_size + 2))
        self.bias_f = nn.Parameter(torch.empty(()))
        self.bias_i = nn.Parameter(torch.empty(()))
        with torch.no_grad():
            self.weight_f.uniform_(-0.01, 0.01)
            self.weight_i.uniform_(-0.01, 0.01)
            self.bias_f.uniform_(4.0, 5.0)
            self.bias_i.uniform_(-5.0, -4.0)

    def gates(self, h: torch.Tensor, theta: torch.Tensor, f_prev: torch.Tensor, i_prev: torch.Tensor):
        """f_t, i_t (N,) from h (N, H), theta_{t-1} (N,) and the previous gates (N,)."""
        H = h.shape[1]
        wf, wi = self.weight_f, self.weight_i
        f = torch.sigmoid(h @ wf[:H] + theta * wf[H] + f_prev * wf[H + 1] + self.bias_f)
        i = torch.sigmoid(h @ wi[:H] + theta * wi[H] + i_prev * wi[H + 1] + self.bias_i)
        return f, i

    def forward(self, h: torch.Tensor, theta: torch.Tensor, grad: torch.Tensor, f_prev: torch.Tensor,
                i_prev: torch.Tensor):
        """theta_t = f_t * theta_{t-1} - i_t * grad_t; returns (theta_t, f_t, i_t), each (N,)."""
        f, i = self.gates(h, theta, f_prev, i_prev)
        return f * theta - i * grad, f, i


class LSTMMetaLearner(MetaLearner):
    """Ravi & Larochelle's meta-learner around ``backbone`` + a linear head (``n_way`` outputs).

    ``inner_steps`` learner updates on the whole support set in training (``eval_inner_steps`` at test),
    each computed by the two-layer coordinate-wise LSTM (module docstring).  Training's meta-loss is the
    query cross-entropy of the final learner; its gradient reaches every LSTM weight and ``c_0``.
    """

    independent_tasks: ClassVar[bool] = True  # per-task losses share only the meta-parameters
    eval_settings: ClassVar[tuple[str, ...]] = ("eval_inner_steps", "eval_bn")

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_steps: int = 12,
                 eval_inner_steps: int = 12, hidden_size: int = 20, preprocess_p: float = 10.0,
                 bn_momentum: float = 0.9, eval_bn: str = "running") -> None:
        super().__init__()
        if inner_steps < 1 or eval_inner_steps < 1:
            raise UserError("algo.inner_steps and algo.eval_inner_steps must be >= 1")
        if eval_bn not in EVAL_BN:
            raise UserError(f"algo.eval_bn={eval_bn!r} is not one of {', '.join(EVAL_BN)}; use algo.eval_bn=running")
        if not 0.0 < bn_momentum <= 1.0:
            raise UserError(f"algo.bn_momentum={bn_momentum} must be in (0, 1]; the paper's code uses 0.9")
        self.net = nn.Sequential(backbone, nn.Linear(feature_dim, n_way))  # its parameters: c_0
        self.norms = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in self.norms:
            m.momentum = bn_momentum
        self.lstm = nn.LSTMCell(4, hidden_size)  # layer 1: [loss~ (2), grad~ (2)] per coordinate
        with torch.no_grad():
            for w in self.lstm.parameters():
                w.uniform_(-0.01, 0.01)
        self.cell = MetaLSTMCell(hidden_size)  # layer 2: cell state = theta
        self.n_way = n_way
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.preprocess_p = preprocess_p
        self.eval_bn = eval_bn

    # ------------------------------------------------------------------ the learner as a flat vector
    def initial_params(self) -> Params:
        """c_0 by name (the learner's initial weights: ``self.net``'s parameters, meta-learned)."""
        return dict(self.net.named_parameters())

    def unflatten(self, flat: torch.Tensor) -> Params:
        """A flat theta (N,) as the learner's parameter dict (views)."""
        names, shapes = zip(*[(k, p.shape) for k, p in self.net.named_parameters()])
        parts = flat.split([math.prod(s) for s in shapes])
        return {k: t.view(s) for k, t, s in zip(names, parts, shapes)}

    def fresh_buffers(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reset running statistics for one episode (the paper: erased before each data set)."""
        out = {}
        for name, m in self.net.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                out[f"{name}.running_mean"] = torch.zeros(m.num_features, dtype=like.dtype, device=like.device)
                out[f"{name}.running_var"] = torch.ones(m.num_features, dtype=like.dtype, device=like.device)
                out[f"{name}.num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=like.device)
        return out

    @contextlib.contextmanager
    def batch_stats(self, on: bool):
        """The learner's batch norms in training mode (batch statistics, running averages updated) or
        eval mode (the running averages); other modules (dropout) keep theirs."""
        was = [m.training for m in self.norms]
        for m in self.norms:
            m.training = on
        try:
            yield
        finally:
            for m, w in zip(self.norms, was):
                m.training = w

    def learner_out(self, theta: torch.Tensor, buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The learner with flat weights theta (N,) on x (B, *x_shape) -> logits (B, n_way)."""
        return functional_call(self.net, {**self.unflatten(theta), **buffers}, (x,))

    # ------------------------------------------------------------------ the inner loop
    def learn(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int,
              buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``steps`` LSTM updates of the learner on one task's support set (S, *x_shape), (S,), from c_0.

        Returns theta_T (N,) with its graph back to the meta-parameters, and the last step's gate means.
        Each step's loss and gradient are taken at a detached theta (no second derivatives); the support
        forwards use batch statistics and update ``buffers`` (the episode's running averages) in place.
        """
        theta = torch.cat([p.reshape(-1) for p in self.initial_params().values()])
        state = None
        f = torch.zeros_like(theta)
        i = torch.zeros_like(theta)
        for _ in range(steps):
            leaf = theta.detach().requires_grad_()
            with torch.enable_grad(), self.batch_stats(True):
                loss = cross_entropy(self.learner_out(leaf, buffers, support_x), support_y)
                (grad,) = torch.autograd.grad(loss, leaf)
            state, theta, f, i = self.update(loss.detach(), grad, state, theta, f, i)
        return theta, {"forget_gate": f.detach().mean(), "input_gate": i.detach().mean()}

    def update(self, loss: torch.Tensor, grad: torch.Tensor, state, theta: torch.Tensor, f: torch.Tensor,
               i: torch.Tensor):
        """One meta-learner step: the preprocessed (loss, gradient) (no graph) through layer 1 (state: its
        (h, c), None at the first step), then the cell update of theta (N,); returns (state, theta, f, i)."""
        n = theta.numel()
        x = torch.cat([preprocess(loss, self.preprocess_p).expand(n, 2), preprocess(grad, self.preprocess_p)], 1)
        state = self.lstm(x, state)  # (N, 4) -> (h, c) (N, hidden_size)
        theta, f, i = self.cell(state[0], theta, grad, f, i)
        return state, theta, f, i

    supports_compile = True

    def compile_for_speed(self) -> None:
        """``device.compile=true``: ``torch.compile`` the meta-learner's step (``update``: layer 1 and the
        cell over every learner coordinate, elementwise work on (N, hidden_size) tensors); the learner's
        own forward stays eager.  State-dict keys unchanged."""
        self.update = torch.compile(self.update)

    # ------------------------------------------------------------------ the interface
    def meta_loss(self, episodes: Episode):
        losses, accs, gates = [], [], []
        for t in range(episodes.n_tasks):
            ep = episodes.task(t)
            buffers = self.fresh_buffers(ep.support_x)
            theta, g = self.learn(ep.support_x, ep.support_y, self.inner_steps, buffers)
            with self.batch_stats(True):  # meta-training: batch statistics for the queries too
                logits = self.learner_out(theta, buffers, ep.query_x)
            losses.append(cross_entropy(logits, ep.query_y))
            accs.append(accuracy(logits.detach(), ep.query_y))
            gates.append(g)
        loss = torch.stack(losses).mean()
        metrics = {"loss": loss.detach(), "acc": torch.stack(accs).mean()}
        for k in gates[0]:
            metrics[k] = torch.stack([g[k] for g in gates]).mean()
        return loss, metrics

    def predict(self, episodes: Episode) -> torch.Tensor:
        self.check_n_way(episodes.n_way)
        out = []
        for t in range(episodes.n_tasks):
            ep = episodes.task(t)
            buffers = self.fresh_buffers(ep.support_x)
            # (under the caller's no_grad: learn() enables autograd for the learner's gradients only)
            theta, _ = self.learn(ep.support_x, ep.support_y, self.eval_inner_steps, buffers)
            with torch.no_grad(), self.batch_stats(self.eval_bn == "batch"):
                out.append(self.learner_out(theta.detach(), buffers, ep.query_x))
        return torch.stack(out)

    def check_n_way(self, n_way: int) -> None:
        if n_way != self.n_way:
            raise UserError(
                f"this {type(self).__name__} model has a {self.n_way}-way learner head and cannot be tested "
                f"{n_way}-way; use data.n_way={self.n_way} (or train a {n_way}-way model)")

    def execution_notes(self, task_threads: int) -> dict[str, str]:
        n = sum(p.numel() for p in self.net.parameters())
        return {"task execution": f"one task after another: a coordinate-wise LSTM over the learner's {n:,} "
                                  f"weights, {self.inner_steps} updates per task"}
