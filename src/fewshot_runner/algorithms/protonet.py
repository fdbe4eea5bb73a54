"""Prototypical Networks (Snell, Swersky & Zemel, 2017)."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_runner.algorithms.base import accuracy, cross_entropy
from fewshot_runner.episode import Episode


def prototypes(support_z: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means of support embeddings.

    support_z (T, S, D), support_y (T, S) in 0..n_way-1 -> (T, n_way, D).
    """
    onehot = torch.nn.functional.one_hot(support_y, n_way).to(support_z.dtype)  # (T, S, n_way)
    sums = onehot.transpose(1, 2) @ support_z
    return sums / onehot.sum(1).unsqueeze(-1)


def squared_euclidean_logits(query_z: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """-||q - p||^2 for query_z (T, Q, D) and protos (T, N, D) -> (T, Q, N)."""
    return -(query_z.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)


class PrototypicalNetworks(nn.Module):
    """Embeds support and query in one pass; logits are negative squared Euclidean
    distances to the support class means.  Works for any n_way at test time."""

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone

    def logits(self, ep: Episode) -> torch.Tensor:
        T, S, Q = ep.n_tasks, ep.support_x.shape[1], ep.query_x.shape[1]
        x = torch.cat([ep.support_x, ep.query_x], dim=1).flatten(0, 1)
        z = self.backbone(x).view(T, S + Q, -1)
        return squared_euclidean_logits(z[:, S:], prototypes(z[:, :S], ep.support_y, ep.n_way))

    def meta_loss(self, episodes: Episode):
        logits = self.logits(episodes)
        loss = cross_entropy(logits, episodes.query_y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits.detach(), episodes.query_y)}

    def predict(self, episodes: Episode) -> torch.Tensor:
        return self.logits(episodes)

    def check_n_way(self, n_way: int) -> None:
        return None

    def compile_for_speed(self) -> None:
        """``device.compile=true``: ``torch.compile`` the backbone in place (state-dict keys unchanged)."""
        self.backbone.compile()
