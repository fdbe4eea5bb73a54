"""MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML"): MAML with the paper's five
changes to its inner loop and training, each a switch of ``conf/algo/mamlpp.yaml``:

* multi-step loss (MSL, ``multi_step_loss``): the outer loss is a weighted sum of the query losses after
  every inner step; the weights start uniform and are annealed, over the first ``msl_steps`` training steps,
  towards the last step alone (:func:`msl_weights`, the paper's code); after that only the last step counts;
* learned per-layer per-step inner rates (LSLR, ``lslr``): one rate per parameter tensor and inner step,
  :class:`~fewshot_runner.algorithms.adaptation.PerStepLR`, meta-learned (own outer rate: ``rates_lr``);
* per-step batch-norm weights and biases (BNWB, ``per_step_bn_weights``): each batch norm's gamma / beta
  become (inner_steps, C) meta-parameters held by the learner (:class:`PerStepNorm`); step k's row is put
  into the functional parameters of inner step k (its support forward and the query forward after it, as
  the paper's code indexes them); they are meta-learned, not adapted in the inner loop;
* per-step running statistics (BNRS, ``per_step_bn_stats``): (inner_steps, C) running mean / variance
  buffers per batch norm; training normalises with the batch statistics and updates step k's row
  (momentum as the batch norm's, 0.1) at every forward of inner step k, task after task.  Validation and
  test (``predict`` in eval mode) normalise with them, step k's row at inner step k, with
  ``eval_bn=running``; with ``eval_bn=batch`` (the default) with each set's batch statistics, as the
  paper's code does (its batch norm always runs ``training=True``: the statistics are kept, never used).
  Measured here (Omniglot 5-way 1-shot, 300 steps, the same checkpoint): batch 89.7 %, running 19.8 %
  (every query scored alike: inner steps through running-statistics batch norm move the activations
  away from the statistics gathered under batch-statistics steps);
* derivative-order annealing (DA, ``first_order_until``): first-order meta-gradients before that training
  step, second order from it on;
* cosine annealing of the outer rate is the engine's ``train.lr_schedule=cosine`` (set by the config).

Executions: with BNRS on, batch norms update shared running statistics in task order, so training runs the
per-task loop, in one thread (no task threads: their order would not be fixed), and so does evaluation with
``eval_bn=running``; otherwise every
``device.batch_tasks`` execution of the gradient family applies (vmap, grouped convolutions: the per-step
weights and the per-step query outputs are the ``step_params`` / ``every_step`` of
:mod:`~fewshot_runner.algorithms.adaptation`).  All schedules are functions of the training step that the
engine passes to :meth:`set_progress` (also right after a resume), so a resumed run follows them exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torch.func import functional_call

from fewshot_runner.algorithms.adaptation import (
    Params, PerStepLR, ScalarLR, UpdateRule, adapt, adapt_batched, adapt_grouped)
from fewshot_runner.algorithms.base import accuracy, cross_entropy
from fewshot_runner.algorithms.gradient import GradientLearner
from fewshot_runner.algorithms.metasgd import rate_key
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

# The paper's code: non-final steps keep at least 0.03 / inner_steps of the loss while the weights anneal.
MSL_FLOOR = 0.03


def msl_weights(steps: int, progress: float) -> list[float]:
    """The multi-step loss weights of ``steps`` inner steps at ``progress`` = training steps done / steps of
    annealing, in [0, 1): every step 1/steps at 0; each earlier step loses progress/steps (down to
    ``MSL_FLOOR``/steps) and the last gains what they lose (up to 1 - (steps-1) * MSL_FLOOR/steps).  As the
    paper's code (get_per_step_loss_importance_vector), with progress = epoch / multi_step_loss_num_epochs."""
    floor = MSL_FLOOR / steps
    early = [max(1.0 / steps - progress / steps, floor)] * (steps - 1)
    last = min(1.0 / steps + progress * (steps - 1) / steps, 1.0 - (steps - 1) * floor)
    return [*early, last]


def at_step(rule: UpdateRule, step: int) -> UpdateRule:
    """``rule`` applied as at inner step ``step`` (one-step calls of :func:`adapt` count their steps from 0)."""
    return lambda params, grads, _: rule(params, grads, step)


class PerStepNorm(nn.Module):
    """One batch norm's per-step state, for ``steps`` inner steps: ``weight``, ``bias`` (steps, C), each row
    a copy of the batch norm's initial gamma / beta (BNWB); ``running_mean``, ``running_var`` (steps, C)
    buffers, zeros and ones (BNRS)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, steps: int, weights: bool, stats: bool) -> None:
        super().__init__()
        self.weights, self.stats = weights, stats
        if weights:
            self.weight = nn.Parameter(bn.weight.detach().unsqueeze(0).repeat(steps, 1))
            self.bias = nn.Parameter(bn.bias.detach().unsqueeze(0).repeat(steps, 1))
        if stats:
            c = bn.num_features
            self.register_buffer("running_mean", torch.zeros(steps, c, dtype=bn.weight.dtype))
            self.register_buffer("running_var", torch.ones(steps, c, dtype=bn.weight.dtype))

    def at(self, name: str, step: int, detach: bool = False, stats: bool = True) -> Params:
        """Step ``step``'s values under the batch norm's parameter / buffer names (``name`` in the net); without
        ``stats`` no running statistics (the batch norm then uses and updates none)."""
        out: Params = {}
        if self.weights:
            w, b = self.weight[step], self.bias[step]
            out[f"{name}.weight"], out[f"{name}.bias"] = (w.detach(), b.detach()) if detach else (w, b)
        if self.stats and stats:  # views of the buffers' rows: batch norm updates them in place in training mode
            out[f"{name}.running_mean"], out[f"{name}.running_var"] = self.running_mean[step], self.running_var[step]
        return out


class MAMLPlusPlus(GradientLearner):
    """backbone + linear head (n_way outputs), adapted per task by ``inner_steps`` inner steps (``eval_inner_steps``
    at test time), with the MAML++ switches of the module docstring.  All switches off (``multi_step_loss``,
    ``lslr``, ``per_step_bn_weights``, ``per_step_bn_stats`` false, ``first_order_until=0``) is MAML.

    ``inner_lr``: the inner rate (LSLR: every learned rate's initial value).  ``eval_bn``: what batch norm
    normalises with at validation and test: ``batch`` (each set's statistics) or ``running`` (BNRS's rows).
    ``msl_steps`` / ``first_order_until``: training steps; None: the paper's share of ``train.steps`` (MSL annealed
    over the first 10 % of training: 10 of 100 epochs in its Omniglot runs; first order for the first half: 50 of
    100 epochs).
    """

    # the learned rates and per-step batch norms exist for inner_steps steps: the test-time rate is no setting
    eval_settings: ClassVar[tuple[str, ...]] = ("eval_inner_steps", "eval_bn")
    # its losses and metrics are the classifiers' (cross-entropy, accuracy); not yet regression
    task_kinds: ClassVar[tuple[str, ...]] = ("classification",)
    anneals_over_steps: ClassVar[bool] = True  # the multi-step loss and derivative order follow train.steps

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, inner_lr: float = 0.1, inner_steps: int = 5,
                 eval_inner_steps: int = 5, multi_step_loss: bool = True, msl_steps: Optional[int] = None,
                 first_order: bool = False, first_order_until: Optional[int] = None, lslr: bool = True,
                 rates_lr: Optional[float] = None, per_step_bn_weights: bool = True, per_step_bn_stats: bool = True,
                 eval_bn: str = "batch", batch_tasks: str = "off") -> None:
        super().__init__(backbone, n_way, feature_dim, inner_steps, eval_inner_steps, batch_tasks)
        for key, v in (("msl_steps", msl_steps), ("first_order_until", first_order_until)):
            if v is not None and v < 0:
                raise UserError(f"algo.{key}={v} is negative; use a number of training steps >= 0, or null")
        if eval_bn not in ("batch", "running"):
            raise UserError(f"algo.eval_bn={eval_bn!r} is not batch or running; use algo.eval_bn=batch")
        if eval_bn == "running" and not per_step_bn_stats:
            raise UserError("algo.eval_bn=running needs the per-step running statistics; set algo.per_step_bn_stats="
                            "true (and train with it), or use algo.eval_bn=batch")
        per_step = [k for k, on in (("lslr", lslr), ("per_step_bn_weights", per_step_bn_weights),
                                    ("per_step_bn_stats", per_step_bn_stats)) if on]
        if per_step and eval_inner_steps > inner_steps:
            raise UserError(f"algo.eval_inner_steps={eval_inner_steps} is more than algo.inner_steps={inner_steps}, "
                            f"the steps that {', '.join('algo.' + k for k in per_step)} learn values for; use "
                            f"algo.eval_inner_steps<={inner_steps}")
        self.inner_lr, self.first_order, self.rates_lr = inner_lr, first_order, rates_lr
        self.multi_step_loss, self.msl_steps, self.first_order_until = multi_step_loss, msl_steps, first_order_until
        self.lslr, self.per_step_bn_weights, self.per_step_bn_stats = lslr, per_step_bn_weights, per_step_bn_stats
        self.eval_bn = eval_bn
        norms = {}
        for name, m in self.net.named_modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not (per_step_bn_weights or per_step_bn_stats):
                continue
            if per_step_bn_weights and m.weight is None:
                raise UserError(f"algo.per_step_bn_weights=true needs batch norms with weights ({name} has none); "
                                f"use algo.per_step_bn_weights=false")
            norms[rate_key(name)] = (name, PerStepNorm(m, inner_steps, per_step_bn_weights, per_step_bn_stats))
            if per_step_bn_weights:  # the learner's per-step rows replace them in every forward
                m.weight, m.bias = None, None
            if per_step_bn_stats:  # use (eval) and update (training) the running statistics put in per step
                m.track_running_stats = True
        self.norm_names = {k: name for k, (name, _) in norms.items()}
        self.norms = nn.ModuleDict({k: n for k, (_, n) in norms.items()})
        names = [n for n, _ in self.net.named_parameters()] if lslr else []
        self.inner_lrs = nn.ParameterDict({rate_key(n): nn.Parameter(torch.full((inner_steps,), float(inner_lr)))
                                           for n in names})
        # the schedule's loss weights, refreshed by set_progress (a buffer: a captured CUDA graph reads them)
        self.register_buffer("msl_w", torch.tensor(msl_weights(inner_steps, 0.0)), persistent=False)
        self._structure: tuple[bool, bool] | None = None

    # ------------------------------------------------------------------ schedules
    def msl_span(self) -> int:
        """The training steps over which the multi-step loss weights anneal (0: none)."""
        if not self.multi_step_loss:
            return 0
        return self.msl_steps if self.msl_steps is not None else self.progress_total // 10

    def msl_active(self) -> bool:
        """Whether this training step's loss weighs every inner step's query loss (else only the last)."""
        return self.progress_step < self.msl_span()

    def second_order_from(self) -> int:
        """The first training step with second-order meta-gradients (derivative-order annealing)."""
        return self.first_order_until if self.first_order_until is not None else self.progress_total // 2

    def second_order(self) -> bool:
        return not self.first_order and self.progress_step >= self.second_order_from()

    def set_progress(self, step: int, total: int) -> None:
        super().set_progress(step, total)
        if self.msl_active():
            w = msl_weights(self.inner_steps, self.progress_step / self.msl_span())
            with torch.no_grad():
                self.msl_w.copy_(torch.tensor(w, dtype=self.msl_w.dtype))
        structure = (self.second_order(), self.msl_active())
        if structure != self._structure:
            # the step's graph changes (derivative order, or the per-step losses end): a CUDA graph captured before
            # (engine/graphs.py) is captured again when the gradients it wrote into are gone
            for p in self.parameters():
                p.grad = None
            self._structure = structure

    # ------------------------------------------------------------------ what the shell asks
    def update_rule(self) -> UpdateRule:
        if not self.lslr:
            return ScalarLR(self.inner_lr)
        return PerStepLR({n: self.inner_lrs[rate_key(n)] for n, _ in self.net.named_parameters()})

    def adapted_keys(self):
        # every parameter of the net (the per-step batch-norm values are put in beside them, never adapted)
        return [n for n, _ in self.net.named_parameters()] if len(self.norms) else None

    def step_params(self, step: int, detach: bool = False, stats: bool = True) -> Params:
        """Inner step ``step``'s per-step batch-norm values, under the net's names (``stats``: with the running
        statistics, where the learner keeps them)."""
        out: Params = {}
        for key, norm in self.norms.items():
            out.update(norm.at(self.norm_names[key], step, detach, stats))
        return out

    def uses_running_stats(self) -> bool:
        """Whether this forward uses (eval, ``eval_bn=running``) or updates (training) the running statistics."""
        return self.per_step_bn_stats and (self.training or self.eval_bn == "running")

    def param_groups(self) -> list[dict[str, Any]]:
        if self.rates_lr is None or not self.lslr:
            return super().param_groups()
        rates = list(self.inner_lrs.parameters())
        ids = {id(r) for r in rates}
        return [{"params": [p for p in self.parameters() if id(p) not in ids]},
                {"params": rates, "lr": float(self.rates_lr)}]

    def task_mode(self, episodes: Episode) -> str:
        return "off" if self.uses_running_stats() else super().task_mode(episodes)

    def runs_tasks_one_by_one(self, episodes: Episode) -> bool:
        # per-step running statistics are updated task after task: no task threads (their order is not fixed)
        return not self.per_step_bn_stats and super().runs_tasks_one_by_one(episodes)

    def execution_notes(self, task_threads: int) -> dict[str, str]:
        if self.per_step_bn_stats:
            return {"task execution": "training: the per-task loop in one thread (algo.per_step_bn_stats=true: the "
                                      "running statistics are updated task after task)"}
        return super().execution_notes(task_threads)

    # ------------------------------------------------------------------ the inner loop
    def query_outputs(self, params: Params, episodes: Episode, steps: int, create_graph: bool, every_step: bool,
                      detach_steps: bool = False) -> torch.Tensor:
        """The query outputs (T, K, n_query_total, n_way) after each of ``steps`` inner steps (K = steps with
        ``every_step``, else 1: after the last), in the execution :meth:`task_mode` picks."""
        mode = self.task_mode(episodes)
        rule, keys = self.update_rule(), self.adapted_keys()
        stats = self.uses_running_stats()
        steps_of = (lambda k: self.step_params(k, detach_steps, stats)) if len(self.norms) else None
        if mode != "off":
            fn = adapt_grouped if mode == "groups" else adapt_batched
            out = fn(self.net, params, episodes.support_x, episodes.support_y, episodes.query_x, rule, steps,
                     create_graph=create_graph, keys=keys, step_params=steps_of, every_step=every_step)
            return out if every_step else out.unsqueeze(1)
        outs = []
        for t in range(episodes.n_tasks):
            ep = episodes.task(t)
            p, per_step = params, []
            for k in range(steps):
                if steps_of is not None:
                    p = {**p, **steps_of(k)}
                p = adapt(self.net, p, ep.support_x, ep.support_y, at_step(rule, k), 1, create_graph, keys=keys)
                if every_step or k == steps - 1:
                    per_step.append(functional_call(self.net, p, (ep.query_x,)))
            outs.append(torch.stack(per_step))
        return torch.stack(outs)

    def meta_loss(self, episodes: Episode):
        every = self.msl_active()
        out = self.query_outputs(self.meta_params(), episodes, self.inner_steps, self.second_order(), every)
        if every:  # sum over steps of w_k x (the mean over tasks of each task's query loss after step k)
            losses = torch.stack([cross_entropy(out[:, k], episodes.query_y) for k in range(out.shape[1])])
            loss = (self.msl_w.to(losses.dtype) * losses).sum()
        else:
            loss = cross_entropy(out[:, -1], episodes.query_y)
        acc = accuracy(out[:, -1].detach(), episodes.query_y)
        return loss, {"loss": loss.detach(), "acc": acc}

    def predict(self, episodes: Episode) -> torch.Tensor:
        self.check_n_way(episodes.n_way)
        was = self.training
        self.train(False)  # as at test: the running statistics used with eval_bn=running, never updated by test data
        try:
            params = {k: v.detach() for k, v in self.meta_params().items()}
            if self.task_mode(episodes) == "on":  # torch.func.grad needs no enable_grad; no outer graph is built
                out = self.query_outputs(params, episodes, self.eval_inner_steps, False, False, detach_steps=True)
            else:
                params = {k: v.requires_grad_() for k, v in params.items()}
                with torch.enable_grad():
                    out = self.query_outputs(params, episodes, self.eval_inner_steps, False, False, detach_steps=True)
        finally:
            self.train(was)
        return out[:, -1].detach()
