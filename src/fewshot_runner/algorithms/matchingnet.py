"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, 2016).

A query's label distribution is the support labels summed by attention, the attention a softmax over the
cosine similarities between the query's embedding and each support embedding:

    P(y = k | x, S) = sum_i a(x, x_i) [y_i = k],   a(x, x_i) = softmax_i s * cos(f(x), g(x_i))

and training minimises -log P(true label).  The paper's softmax reads the cosines as they are (s = 1,
``algo.scale``'s default); cosines lie in [-1, 1], so with s = 1 the attention can never be sharp and the
loss stays near 1 at perfect accuracy.  ``algo.scale`` (s > 0, a temperature 1/s) sharpens it: a choice to
make on validation classes (docs/methods.md).  With ``fce=true`` the embeddings are the paper's full context
embeddings (its appendix): g is a bidirectional LSTM over the support set, f an attention LSTM that reads
the support set K times (:class:`FullContextEmbeddings`).  Without, f = g = the backbone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.algorithms.base import MetaLearner, accuracy
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError


def cosine_attention(query_z: torch.Tensor, support_z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """log of the softmax over the support of scale * cos(query, support): query_z (T, Q, D), support_z (T, S, D)
    -> (T, Q, S)."""
    cos = F.normalize(query_z, dim=-1) @ F.normalize(support_z, dim=-1).transpose(1, 2)
    return (cos * scale).log_softmax(-1)


def attention_label_sum(log_attention: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """log P(y = k | query) = log sum_i a_i [y_i = k], in log space (a sharp attention cannot underflow to
    log 0): log_attention (T, Q, S), support_y (T, S) -> (T, Q, n_way)."""
    mask = F.one_hot(support_y, n_way).to(torch.bool).transpose(1, 2)  # (T, n_way, S)
    masked = log_attention.unsqueeze(2).masked_fill(~mask.unsqueeze(1), float("-inf"))  # (T, Q, n_way, S)
    return masked.logsumexp(-1)


class FullContextEmbeddings(nn.Module):
    """The paper's full context embeddings (appendix A.1, A.2), for embeddings of size ``dim``.

    g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i): a bidirectional LSTM (hidden size ``dim``) over the support
    embeddings g'(x_i) in the episode's order.  f(x, S) = h_K after K = ``read_steps`` steps of

        h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1});   h_k = h^_k + f'(x)
        r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)

    The LSTM's gates read f'(x), h_{k-1} and the read-out r_{k-1}: an ``LSTMCell`` whose input is
    [f'(x), r_{k-1}] and whose hidden state is h_{k-1} (the same linear map of the three).  The paper leaves
    the start open: here h_0 = f'(x) (h^_0 = 0) and c_0 = 0.
    """

    def __init__(self, dim: int, read_steps: int) -> None:
        super().__init__()
        if read_steps < 1:
            raise UserError(f"algo.fce_steps={read_steps}: the attention LSTM needs at least one read step; "
                            f"set algo.fce_steps=1 or more")
        self.read_steps = read_steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)

    def support(self, support_z: torch.Tensor) -> torch.Tensor:
        """g(S): support_z (T, S, D) -> (T, S, D)."""
        out, _ = self.support_lstm(support_z)  # (T, S, 2D): forward then backward hidden states
        forward, backward = out.chunk(2, dim=-1)
        return forward + backward + support_z

    def query(self, query_z: torch.Tensor, support_g: torch.Tensor) -> torch.Tensor:
        """f(x, S): query_z (T, Q, D) and g(S) (T, S, D) -> (T, Q, D)."""
        T, Q, D = query_z.shape
        x = query_z.reshape(T * Q, D)
        h, c = query_z, query_z.new_zeros(T * Q, D)
        for _ in range(self.read_steps):
            read = (h @ support_g.transpose(1, 2)).softmax(-1) @ support_g  # r_{k-1} (T, Q, D)
            h_hat, c = self.query_cell(torch.cat([x, read.reshape(T * Q, D)], dim=1), (h.reshape(T * Q, D), c))
            h = h_hat.view(T, Q, D) + query_z
        return h


class MatchingNetworks(MetaLearner):
    """Embeds support and query in one backbone pass (flat features), optionally through the full context
    embeddings; logits are log P(y | x, S) of the attention-weighted label sum.  Works for any n_way.

    Its batch norm (training mode) spans every task of a batch, so ``independent_tasks`` stays False (as
    ProtoNet); the backbone can be ``torch.compile``d (``device.compile=true``)."""

    supports_compile = True

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, fce: bool = False,
                 fce_steps: int = 5, scale: float = 1.0) -> None:
        super().__init__()
        if not (scale > 0 and math.isfinite(scale)):
            raise UserError(f"algo.scale={scale}: the cosine scale must be positive (1: the paper's softmax over "
                            f"plain cosines; e.g. 10 sharpens the attention); set algo.scale to a number > 0")
        self.backbone = backbone
        self.scale = float(scale)
        self.fce = FullContextEmbeddings(feature_dim, fce_steps) if fce else None

    def embed(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """g(S) (T, S, D) and f(query) (T, Q, D): one backbone pass, then the full context embeddings if on."""
        T, S, Q = ep.n_tasks, ep.support_x.shape[1], ep.query_x.shape[1]
        x = torch.cat([ep.support_x, ep.query_x], dim=1).flatten(0, 1)
        z = self.backbone(x).view(T, S + Q, -1)
        support_z, query_z = z[:, :S], z[:, S:]
        if self.fce is None:
            return support_z, query_z
        support_g = self.fce.support(support_z)
        return support_g, self.fce.query(query_z, support_g)

    def logits(self, ep: Episode) -> torch.Tensor:
        """log P(y = k | query, S): (T, Q, n_way)."""
        support_z, query_z = self.embed(ep)
        return attention_label_sum(cosine_attention(query_z, support_z, self.scale), ep.support_y, ep.n_way)

    def meta_loss(self, episodes: Episode):
        logits = self.logits(episodes)
        loss = F.nll_loss(logits.reshape(-1, logits.shape[-1]), episodes.query_y.reshape(-1))
        return loss, {"loss": loss.detach(), "acc": accuracy(logits.detach(), episodes.query_y)}

    def predict(self, episodes: Episode) -> torch.Tensor:
        return self.logits(episodes)

    def embed_episode(self, episodes: Episode) -> dict[str, torch.Tensor]:
        """The embeddings the cosine attention compares: g(S) and f(query) (after FCE when it is on)."""
        support_z, query_z = self.embed(episodes)
        return {"support": support_z, "query": query_z}

    def compile_for_speed(self) -> None:
        """``device.compile=true``: ``torch.compile`` the backbone in place (state-dict keys unchanged)."""
        self.backbone.compile()
