"""Everything the one training/evaluation loop may ask of a meta-learner, declared once.

A new learner subclasses :class:`MetaLearner`, implements :meth:`~MetaLearner.meta_loss` and
:meth:`~MetaLearner.predict`, and overrides only the hooks whose defaults do not fit it.  The
engine calls nothing else: it never probes a learner with ``getattr`` and never tests its class
name, so every learner gets the same checks and messages.  Read this file top to bottom to know
what the loop can ask (docs/adding_an_algorithm.md walks through MAML and ProtoNet).

The loop's order of calls, for orientation (engine/run.py):

1. ``__init__(backbone=..., n_way=..., feature_dim=..., **algo config)`` (Hydra ``_target_``);
   ``check_n_way(eval n_way)``.
2. ``param_groups()`` -> the optimizer (``optimizer=adam|sgd|adamw``, lr ``train.outer_lr``).
3. ``batch_source(split, n_way, n_shot, n_query, seed)`` -> what training draws its batches from
   (checkpointed through its ``state_dict``).
4. Each step: ``set_progress(step, total)``; then ``outer_step(batch, optimizer)`` if the learner
   defines one, else a gradient step on ``meta_loss(batch)`` (chunked over tasks and run in task
   threads where ``independent_tasks`` allows it).
5. Validation, the test and ``fewshot eval``: ``predict(episodes)`` under ``torch.no_grad()``;
   ``fewshot eval algo.KEY=VALUE`` may change the keys named in ``eval_settings``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError


class MetaLearner(nn.Module):
    """The learner interface, each hook with its default (see the module docstring for the order).

    Subclasses are ``nn.Module``s; their ``state_dict`` is what checkpoints hold.
    """

    # ------------------------------------------------------------------ what the learner is
    #: The batch's loss is a mean of per-task terms that share nothing but the weights, so the engine
    #: may split a batch into chunks of tasks (``train.task_chunk``, ``device.memory_cap_mb``) and run
    #: tasks in worker threads (``device.task_threads``).  False (the default) refuses both in one line:
    #: ProtoNet's batch norm spans the batch, so chunks would change its objective.
    independent_tasks: ClassVar[bool] = False

    #: ``device.compile=true`` may ``torch.compile`` this learner (through :meth:`compile_for_speed`).
    #: False refuses that setting in one line (gradient-based inner loops: torch.compile cannot do their
    #: double backward).
    supports_compile: ClassVar[bool] = False

    #: Keys of the learner's ``algo`` config that ``fewshot eval algo.KEY=VALUE`` may override: its
    #: test-time adaptation settings (MAML: ``eval_inner_steps``, ``inner_lr``).  Other keys are refused.
    eval_settings: ClassVar[tuple[str, ...]] = ()

    #: What the learner asks of its backbone: ``"flat"`` features (N, D) from ``backbone(x)``, or
    #: ``"map"``: feature maps (N, C, H, W) from ``backbone.forward_map(x)`` (Relation Networks compare
    #: maps).  A backbone without ``forward_map`` is refused for a ``"map"`` learner in one line.
    feature_kind: ClassVar[str] = "flat"

    #: The task kinds (``split.task_kind``: ``"classification"``, ``"regression"``) the learner can learn;
    #: the engine refuses another in one line before building it, then calls :meth:`set_task_kind`.
    task_kinds: ClassVar[tuple[str, ...]] = ("classification",)

    #: True where a schedule inside the learner reads ``train.steps`` (:meth:`set_progress`'s ``total``:
    #: Reptile's outer step size, MAML++'s annealings): a resumed run must then keep its ``train.steps``.
    anneals_over_steps: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.task_kind = "classification"  # set_task_kind (a plain str: task-thread replicas copy it)
        self.progress_step = 0  # set_progress (plain ints: task-thread replicas copy them)
        self.progress_total = 0

    # ------------------------------------------------------------------ training
    def meta_loss(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The outer objective of a batch from :meth:`batch_source` (episodes: a leading task dimension),
        averaged over its tasks, with a graph back to the meta-parameters; and detached scalar metrics
        (at least ``"loss"``; ``"acc"`` for classifiers)."""
        raise NotImplementedError(f"{type(self).__name__} must define meta_loss(batch) -> (loss, metrics)")

    def outer_step(self, batch: Any, optimizer: torch.optim.Optimizer) -> dict[str, float] | None:
        """The outer update, for learners whose update is not a gradient step on :meth:`meta_loss`
        (Reptile).  Return the step's metrics (``"loss"`` included).  The default returns None: the
        engine then zeroes the gradients, back-propagates ``meta_loss`` (over chunks and task threads
        where allowed), clips (``train.grad_clip``) and steps the optimizer."""
        return None

    @classmethod
    def has_own_outer_step(cls) -> bool:
        """Whether the learner overrides :meth:`outer_step` (then no chunking and no CUDA graphs)."""
        return cls.outer_step is not MetaLearner.outer_step

    def batch_source(self, split, n_way: int, n_shot: int, n_query: int, seed: int):
        """What training batches come from: an object with ``sample(meta_batch_size)``, ``state_dict()``
        and ``load_state_dict(state)`` (checkpointed and restored with the run).  The default: episodes
        of the training shape from :class:`~fewshot_runner.data.sampler.EpisodeSampler`.  Learners that
        train on plain class-labelled mini-batches (Baseline) or pairs (Siamese) return the data layer's
        class-batch or pair sources over the same ``split`` and ``seed``."""
        return split.episode_sampler(n_way, n_shot, n_query, seed=seed)  # (a regression split's: its task sampler)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups.  The default: one group of every parameter, at
        ``train.outer_lr``.  A learner with learned inner rates may give them a group of their own
        (a dict with ``"params"`` and, say, ``"lr"``)."""
        return [{"params": list(self.parameters())}]

    def set_task_kind(self, kind: str) -> None:
        """Called once after building, with the task kind of the data (one of :attr:`task_kinds`): a learner
        that learns several picks its loss and metric here (gradient.py: cross-entropy and ``"acc"``, or the
        MSE and ``"mse"``).  The default records it as ``task_kind``."""
        self.task_kind = kind

    def set_progress(self, step: int, total: int) -> None:
        """Called before every training step with the steps done so far and ``train.steps`` (also right
        after a resume), for schedules inside the learner (MAML++'s per-step loss weights and its
        derivative-order annealing).  The default records them as ``progress_step`` / ``progress_total``."""
        self.progress_step, self.progress_total = int(step), int(total)

    def execution_notes(self, task_threads: int) -> dict[str, str]:
        """What the start-of-run banner says about how this learner runs a batch, by label (e.g.
        ``{"task execution": "..."}``); ``task_threads``: the resolved ``device.task_threads``."""
        return {"task execution": "one forward and backward over the whole batch"}

    def runs_tasks_one_by_one(self, episodes: Episode) -> bool:
        """Whether this batch's tasks run one after another (then, with ``independent_tasks``, the engine
        may spread them over task threads on the CPU).  False for learners that batch their tasks."""
        return True

    # ------------------------------------------------------------------ evaluation
    def predict(self, episodes: Episode) -> torch.Tensor:
        """Adapt to (or embed) each task's support set and score its queries: logits (n_tasks,
        n_query_total, n_way) (regression: outputs (n_tasks, n_query_total, 1)).  Called under
        ``torch.no_grad()``; learners that adapt by gradient re-enable autograd for their inner loop but
        build no outer graph."""
        raise NotImplementedError(f"{type(self).__name__} must define predict(episodes) -> logits")

    def embed_episode(self, episodes: Episode) -> dict[str, torch.Tensor] | None:
        """The embeddings a metric learner compares, for the embedding picture (engine/pictures.py):
        ``{"support": (T, n_support, D), "query": (T, n_query_total, D)}`` and, where the learner has
        them, ``"prototypes": (T, n_way, D)``.  Called under ``torch.no_grad()`` in eval mode.  The
        default None: no embedding picture (gradient-based learners)."""
        return None

    def test_measures(self, split, n_way: int, per_class: int, n_tasks: int, seed: int, runtime,
                      transform=None) -> dict[str, torch.Tensor]:
        """The learner's own test measures beside the task metric: ``{name: (n_tasks,) per-task values}`` over
        ``n_tasks`` tasks of ``split`` fixed by ``seed``, in the training shape (``n_way`` classes,
        ``per_class`` items each); ``runtime``: the run's device and autocast (engine/device.py),
        ``transform``: the evaluation transform.  The engine writes each as ``test/<name>`` (mean) and
        ``test/<name>_ci95`` to results.json and the logger.  Called under ``torch.no_grad()`` in eval mode.
        The default: none (MANN: its accuracy at the k-th presentation of a class)."""
        return {}

    def check_n_way(self, n_way: int) -> None:
        """Raise a one-line UserError when this learner cannot serve ``n_way``-way episodes (a fixed-size
        head).  The default accepts any ``n_way``."""
        return None

    def compile_for_speed(self) -> None:
        """``device.compile=true``: ``torch.compile`` what is worth compiling, in place, keeping the
        ``state_dict`` keys.  Only called when ``supports_compile`` is True."""
        raise UserError(f"{type(self).__name__} does not support device.compile=true; use device.compile=false")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean accuracy over every leading dimension."""
    return (logits.argmax(-1) == labels).float().mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (..., n_way) logits and (...) labels, averaged."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of (..., 1) outputs against (...) float targets, averaged over every point."""
    return (outputs.squeeze(-1) - targets).pow(2).mean()
