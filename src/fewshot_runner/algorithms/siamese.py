"""Siamese networks (Koch, Zemel & Salakhutdinov, 2015).

Training: pairs of images, both through one backbone; the pair's score is ``sum_j alpha_j |h1_j - h2_j| + bias``
(a weighted L1 distance of the features), its probability of "same class" the sigmoid of that, and the loss
the binary cross-entropy.  ``pairs=sampled`` (the paper's): ``train.meta_batch_size`` pairs per step from
``data.batches.PairSampler``, half from one class, half from two.  ``pairs=all``: the same number of images per
step (2 x ``train.meta_batch_size``, in whole class-grouped batches: episodes of the training shape,
``data.train_n_way`` classes x ``train_n_shot + train_n_query`` images, at least one), every pair within a batch
scored, the same-class and the different-class pairs weighted half and half as in the sampled batches: one
backbone pass of n images gives about n^2 / 2 pairs instead of n / 2.
Test: N-way K-shot classification by similarity: each query scores every support image, and a class gets the
largest of its K support scores (``shot_score=max``; 1-shot: the most similar support image) or the mean
of its K probabilities (``shot_score=mean``).

The paper's net is a large one for 105x105 images; here the embedding is the configured backbone (Conv4 on
28x28 Omniglot by default), optionally followed by the paper's fully connected sigmoid layer (``embed_dim``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.algorithms.base import MetaLearner
from fewshot_runner.episode import Episode, PairBatch
from fewshot_runner.errors import UserError

SHOT_SCORES = ("max", "mean")
PAIRS = ("sampled", "all")


def weighted_l1_logits(z1: torch.Tensor, z2: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Pair logits ``sum_j alpha_j |z1_j - z2_j| + bias``: z1 (..., D) and z2 (..., D) broadcast against each
    other, alpha (D,), bias () -> (...).  sigmoid(logits) is the probability that the pair shows one class."""
    return (z1 - z2).abs() @ alpha + bias


def class_scores(pair_logits: torch.Tensor, support_y: torch.Tensor, n_way: int, shot_score: str) -> torch.Tensor:
    """Each query's score for each class from its pair logits against the support images.

    pair_logits (T, Q, S), support_y (T, S) in 0..n_way-1 -> (T, Q, n_way):
    ``max``: the largest pair logit of the class's support images (the logit of its most similar image);
    ``mean``: the logit of the mean "same" probability over the class's support images, computed in log space
    (log-mean-exp of log-sigmoids) so that saturated probabilities keep their order.
    """
    member = F.one_hot(support_y, n_way).transpose(1, 2).bool().unsqueeze(1)  # (T, 1, n_way, S)
    s = pair_logits.unsqueeze(2)  # (T, Q, 1, S)
    if shot_score == "max":
        return s.masked_fill(~member, float("-inf")).amax(-1)
    count = member.sum(-1).to(pair_logits.dtype)  # (T, 1, n_way)
    log_p = F.logsigmoid(s).masked_fill(~member, float("-inf")).logsumexp(-1) - count.log()
    log_q = F.logsigmoid(-s).masked_fill(~member, float("-inf")).logsumexp(-1) - count.log()
    return log_p - log_q


def all_pairs_loss(z: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor):
    """The balanced pair loss over every pair of a class-grouped batch.

    z (T, n, D) features and y (T, n) class labels of T batches -> (loss, logits (P,), same (P,)): the logits and
    same-class flags of the P = T n (n - 1) / 2 unordered pairs (i < j within a batch); the loss is the mean
    binary cross-entropy of the same-class pairs plus that of the different-class pairs, halved (each half
    of the loss, as in ``PairSampler``'s half-and-half batches)."""
    n = z.shape[1]
    i, j = torch.triu_indices(n, n, offset=1, device=z.device)
    logits = weighted_l1_logits(z[:, i], z[:, j], alpha, bias).flatten()
    same = (y[:, i] == y[:, j]).flatten().to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, same, reduction="none")
    n_same = same.sum()
    loss = 0.5 * (bce * same).sum() / n_same + 0.5 * (bce * (1 - same)).sum() / (same.numel() - n_same)
    return loss, logits, same


class SiameseNetwork(MetaLearner):
    """Koch et al.'s Siamese network over the configured backbone, trained on same/different pairs.

    Batch norm (training mode) spans both images of every pair of the batch, so ``independent_tasks`` stays
    False.  Any ``n_way`` / ``n_shot`` at test time.
    """

    eval_settings = ("shot_score",)

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, embed_dim: int | None = None,
                 shot_score: str = "max", pairs: str = "sampled") -> None:
        super().__init__()
        if pairs not in PAIRS:
            raise UserError(f"algo.pairs={pairs!r} is not one of {', '.join(PAIRS)}: the training pairs (sampled: "
                            f"train.meta_batch_size pairs per step; all: every pair of a class-grouped batch)")
        if shot_score not in SHOT_SCORES:
            raise UserError(f"algo.shot_score={shot_score!r} is not one of {', '.join(SHOT_SCORES)}: how a class "
                            f"scores from its K support images (max: the most similar one; mean: their mean)")
        if embed_dim is not None and (isinstance(embed_dim, bool) or embed_dim < 1):
            raise UserError(f"algo.embed_dim must be a positive integer or null (got {embed_dim!r})")
        self.backbone = backbone
        self.shot_score = shot_score
        self.pairs = pairs
        # the paper's fully connected sigmoid layer after the convolutions (null: the backbone's features)
        self.embed = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.Sigmoid()) if embed_dim else nn.Identity()
        dim = embed_dim or feature_dim
        self.alpha = nn.Parameter(torch.empty(dim).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim)))
        self.bias = nn.Parameter(torch.zeros(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, *x_shape) -> features h (N, D) compared by the weighted L1 distance."""
        return self.embed(self.backbone(x))

    def batch_source(self, split, n_way: int, n_shot: int, n_query: int, seed: int):
        """``pairs=sampled``: same/different pairs of the training split (``train.meta_batch_size`` pairs per step);
        ``pairs=all``: episodes of the training shape, as many as 2 x ``train.meta_batch_size`` images hold."""
        from fewshot_runner.data.batches import EpisodesByImages, PairSampler

        if self.pairs == "all":  # (the images of train.meta_batch_size pairs, in whole episodes)
            return EpisodesByImages(super().batch_source(split, n_way, n_shot, n_query, seed), images_per_item=2)

        return PairSampler(split, seed=seed)

    def pair_logits(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x1, x2 (n, *x_shape), both in one backbone pass -> logits (n,) of "same class"."""
        z = self.features(torch.cat([x1, x2]))
        return weighted_l1_logits(z[: len(x1)], z[len(x1):], self.alpha, self.bias)

    def meta_loss(self, batch: PairBatch | Episode):
        if self.pairs == "all" and isinstance(batch, Episode):
            x = torch.cat([batch.support_x, batch.query_x], dim=1)
            y = torch.cat([batch.support_y, batch.query_y], dim=1)
            z = self.features(x.flatten(0, 1)).view(*y.shape, -1)
            loss, logits, same = all_pairs_loss(z, y, self.alpha, self.bias)
            acc = ((logits.detach() > 0).to(same.dtype) == same).float().mean()
            return loss, {"loss": loss.detach(), "acc": acc}
        if not isinstance(batch, PairBatch):
            raise UserError(f"SiameseNetwork trains on same/different pairs, not {type(batch).__name__}; its "
                            f"batch_source gives them (data.batches.PairSampler)")
        logits = self.pair_logits(batch.x1, batch.x2)
        target = batch.same.to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        acc = ((logits.detach() > 0).to(target.dtype) == target).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}

    def embed_episode(self, episodes: Episode) -> dict[str, torch.Tensor]:
        """Support (T, S, D) and query (T, Q, D) features, from one backbone pass."""
        T, S = episodes.support_x.shape[:2]
        x = torch.cat([episodes.support_x, episodes.query_x], dim=1).flatten(0, 1)
        z = self.features(x).view(T, -1, self.alpha.shape[0])
        return {"support": z[:, :S], "query": z[:, S:]}

    def predict(self, episodes: Episode) -> torch.Tensor:
        """Logits (T, Q, n_way): each class's score from its support images (``shot_score``)."""
        z = self.embed_episode(episodes)
        pairs = weighted_l1_logits(z["query"].unsqueeze(2), z["support"].unsqueeze(1), self.alpha, self.bias)
        return class_scores(pairs, episodes.support_y, episodes.n_way, self.shot_score)
