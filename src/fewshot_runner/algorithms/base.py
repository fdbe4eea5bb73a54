"""The interface every meta-learner offers the one training/evaluation loop."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from fewshot_runner.episode import Episode


@runtime_checkable
class MetaLearner(Protocol):
    """What the engine calls.  Episodes are batched (leading task dimension).

    meta_loss(episodes) -> (loss, metrics): the outer objective averaged over tasks, with a
        graph back to the meta-parameters; metrics are detached scalars ("loss", "acc").
    predict(episodes) -> logits (n_tasks, n_query_total, n_way): adapt on the support set,
        score the queries.  Called under ``torch.no_grad()``; learners that adapt by gradient
        re-enable autograd for their inner loop but build no outer graph.
    check_n_way(n_way): raise a UserError when this learner cannot serve ``n_way``-way
        episodes (e.g. a fixed-size head).

    A learner whose outer update is not a gradient step on ``meta_loss`` (Reptile) also
    defines ``outer_step(episodes, optimizer) -> metrics``; the engine uses it when present.
    A learner that can run ``torch.compile``d defines ``compile_for_speed()`` (``device.compile=true``;
    without it that setting is refused with one line).
    """

    def meta_loss(self, episodes: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def predict(self, episodes: Episode) -> torch.Tensor: ...

    def check_n_way(self, n_way: int) -> None: ...


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean accuracy over every leading dimension."""
    return (logits.argmax(-1) == labels).float().mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (..., n_way) logits and (...) labels, averaged."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
