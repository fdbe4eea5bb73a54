"""Prototypical Networks (Snell, Swersky & Zemel, 2017)."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_runner.algorithms.base import MetaLearner, accuracy, cross_entropy
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


def rotated_logits(support_z: torch.Tensor, query_z: torch.Tensor, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """The episode re-split k = shot + query ways: each class's k images, in the order drawn, take
    turns as the support (rotation r: images r..r+shot-1 mod k), the rest are the queries, for every
    class at once.  Returns logits (T, k, n_way * query, n_way) and their labels; rotation 0 is the
    episode as sampled.  Needs the same shot and query count for every class.
    """
    T, S, D = support_z.shape
    n_way = ep.n_way
    shot, query = S // n_way, query_z.shape[1] // n_way
    k = shot + query
    y = torch.cat([ep.support_y, ep.query_y], dim=1)  # (T, S + Q)
    order = y.argsort(dim=1, stable=True)  # class-major, each class's support first
    expected = torch.arange(n_way, device=y.device).repeat_interleave(k)
    if S != n_way * shot or query_z.shape[1] != n_way * query or not torch.equal(
            torch.gather(y, 1, order), expected.expand(T, -1)):
        raise ValueError("rotate_support needs n_shot support and n_query query images of every class")
    z = torch.cat([support_z, query_z], dim=1)
    z = torch.gather(z, 1, order.unsqueeze(-1).expand(-1, -1, D)).view(T, n_way, k, D)
    r = torch.arange(k, device=z.device)
    support_idx = (r.view(k, 1) + torch.arange(shot, device=z.device)) % k  # (k, shot)
    query_idx = (r.view(k, 1) + shot + torch.arange(query, device=z.device)) % k  # (k, query)
    protos = z[:, :, support_idx].mean(3).transpose(1, 2)  # (T, k, n_way, D)
    q = z[:, :, query_idx].permute(0, 2, 1, 3, 4).reshape(T, k, n_way * query, D)
    # ||q - p||^2 as ||q||^2 - 2 q.p + ||p||^2: k times the logits without a (Q, N, D) broadcast
    logits = 2 * q @ protos.transpose(-1, -2) - q.pow(2).sum(-1, keepdim=True) - protos.pow(2).sum(-1).unsqueeze(-2)
    labels = torch.arange(n_way, device=z.device).repeat_interleave(query).expand(T, k, -1)
    return logits, labels


class PrototypicalNetworks(MetaLearner):
    """Embeds support and query in one pass; logits are negative squared Euclidean
    distances to the support class means.  Works for any n_way at test time.

    Its batch norm (training mode) spans every task of a batch, so ``independent_tasks`` stays False
    (no chunks, no task threads); its backbone can be ``torch.compile``d (``device.compile=true``)."""

    supports_compile = True

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, rotate_support: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.rotate_support = rotate_support

    def embed(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Support (T, S, D) and query (T, Q, D) embeddings from one backbone pass."""
        T, S, Q = ep.n_tasks, ep.support_x.shape[1], ep.query_x.shape[1]
        x = torch.cat([ep.support_x, ep.query_x], dim=1).flatten(0, 1)
        z = self.backbone(x).view(T, S + Q, -1)
        return z[:, :S], z[:, S:]

    def logits(self, ep: Episode) -> torch.Tensor:
        support_z, query_z = self.embed(ep)
        return squared_euclidean_logits(query_z, prototypes(support_z, ep.support_y, ep.n_way))

    def meta_loss(self, episodes: Episode):
        if self.rotate_support:
            logits, labels = rotated_logits(*self.embed(episodes), episodes)
        else:
            logits, labels = self.logits(episodes), episodes.query_y
        loss = cross_entropy(logits, labels)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits.detach(), labels)}

    def predict(self, episodes: Episode) -> torch.Tensor:
        return self.logits(episodes)

    def embed_episode(self, episodes: Episode) -> dict[str, torch.Tensor]:
        """Support (T, S, D), query (T, Q, D) and prototype (T, n_way, D) embeddings (the embedding picture)."""
        support_z, query_z = self.embed(episodes)
        return {"support": support_z, "query": query_z,
                "prototypes": prototypes(support_z, episodes.support_y, episodes.n_way)}

    def compile_for_speed(self) -> None:
        """``device.compile=true``: ``torch.compile`` the backbone in place (state-dict keys unchanged)."""
        self.backbone.compile()
