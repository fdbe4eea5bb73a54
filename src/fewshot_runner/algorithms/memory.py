"""The external memory of MANN (Santoro et al. 2016, "Meta-learning with memory-augmented neural networks"),
as small pure functions, one per equation of its section 3, plus the sequence bookkeeping of its episodes.

Shapes: B sequences (tasks) at once, H read heads, N memory slots of width W.

* content-based reads: ``K(k, M(i)) = k . M(i) / (|k| |M(i)|)`` (cosine), ``w_r = softmax_i K``,
  ``r = sum_i w_r(i) M(i)`` (:func:`cosine_similarity`, :func:`read_weights`, :func:`read`);
* least-recently-used access (LRUA): usage ``w_u <- gamma * w_u + w_r + w_w`` (summed over heads,
  :func:`usage_update`); least-used weights ``w_lu(i) = 1`` for the ``n`` slots of smallest usage, else 0
  (:func:`least_used`); write weights ``w_w = sigmoid(alpha) * w_r_prev + (1 - sigmoid(alpha)) * w_lu_prev``
  (:func:`write_weights`); before writing, the least-used slot (by the previous usage) is set to zero, then
  ``M(i) <- M(i) + sum_heads w_w(i) k`` (:func:`write`).

The episode bookkeeping: the label of item t is input at step t + 1, a zero vector at step 0
(:func:`sequence_inputs`); which presentation of its class each item is (:func:`instance_numbers`) and the
accuracy per presentation (:func:`instance_accuracy`), as the paper reports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Added under the square roots of the norms in the cosine: a zeroed slot (all slots at the start) has
#: similarity 0, not NaN, and stays differentiable.
COSINE_EPS = 1e-8

#: The presentations the paper's tables report (1st, 2nd, 3rd, 4th, 5th, 10th instance of a class).
PAPER_INSTANCES = (1, 2, 3, 4, 5, 10)


def cosine_similarity(keys: torch.Tensor, memory: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """keys (B, H, W), memory (B, N, W) -> (B, H, N): k . M(i) / (sqrt(|k|^2 + eps) sqrt(|M(i)|^2 + eps))."""
    dots = keys @ memory.transpose(1, 2)
    k_norm = (keys.pow(2).sum(-1, keepdim=True) + eps).sqrt()  # (B, H, 1)
    m_norm = (memory.pow(2).sum(-1) + eps).sqrt().unsqueeze(1)  # (B, 1, N)
    return dots / (k_norm * m_norm)


def read_weights(keys: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Content-based read weights, (B, H, N): softmax over the slots of the cosine similarity (no key
    strength: the paper's equations have none)."""
    return torch.softmax(cosine_similarity(keys, memory), dim=-1)


def read(weights: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Read vectors r = sum_i w_r(i) M(i): weights (B, H, N), memory (B, N, W) -> (B, H, W)."""
    return weights @ memory


def usage_update(usage: torch.Tensor, w_read: torch.Tensor, w_write: torch.Tensor, gamma: float) -> torch.Tensor:
    """w_u <- gamma * w_u + sum_heads w_r + sum_heads w_w: usage (B, N), w_read and w_write (B, H, N) -> (B, N)."""
    return gamma * usage + w_read.sum(1) + w_write.sum(1)


def least_used(usage: torch.Tensor, n: int) -> torch.Tensor:
    """w_lu, (B, N): 1.0 at the ``n`` slots of smallest usage, 0.0 elsewhere; ties go to the lower slot index
    (the paper's ``w_u(i) <= m(w_u, n)``, the n-th smallest, marks more than ``n`` slots on ties: here always
    exactly ``n``, so the all-zero usage of the start picks slots 0..n-1).  No gradient flows through it."""
    idx = torch.argsort(usage.detach(), dim=-1, stable=True)[:, :n]
    return torch.zeros_like(usage).scatter_(-1, idx, 1.0)


def write_weights(alpha: torch.Tensor, w_read_prev: torch.Tensor, w_lu_prev: torch.Tensor) -> torch.Tensor:
    """w_w = sigmoid(alpha) * w_r_prev + (1 - sigmoid(alpha)) * w_lu_prev: alpha (B, H, 1) (one gate per head),
    w_read_prev (B, H, N), w_lu_prev (B, N) (shared by the heads) -> (B, H, N)."""
    gate = torch.sigmoid(alpha)
    return gate * w_read_prev + (1.0 - gate) * w_lu_prev.unsqueeze(1)


def write(memory: torch.Tensor, w_write: torch.Tensor, keys: torch.Tensor, usage_prev: torch.Tensor) -> torch.Tensor:
    """The LRUA write: the slot of smallest previous usage (``usage_prev`` (B, N); ties: the lower index) is set
    to zero, then M(i) <- M(i) + sum_heads w_w(i) k (the paper writes the read key k itself).
    memory (B, N, W), w_write (B, H, N), keys (B, H, W) -> the new memory (B, N, W)."""
    keep = 1.0 - least_used(usage_prev, 1)  # (B, N)
    return memory * keep.unsqueeze(-1) + w_write.transpose(1, 2) @ keys


def sequence_inputs(features: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """The controller's external input at each step: the item's features, then the one-hot label of the
    *previous* item (zeros at step 0), so the label of item t is seen at step t + 1 and never at t.
    features (B, L, D), labels (B, L) long -> (B, L, D + n_way)."""
    shown = F.one_hot(labels, n_way).to(features.dtype)  # (B, L, n_way)
    previous = torch.cat([torch.zeros_like(shown[:, :1]), shown[:, :-1]], dim=1)
    return torch.cat([features, previous], dim=-1)


def instance_numbers(labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Which presentation of its class each item is, 1-based: labels (B, L) -> (B, L) long (the first item of a
    class 1, its second 2, ...)."""
    hot = F.one_hot(labels, n_way)
    return (hot.cumsum(1) * hot).sum(-1)


def instance_accuracy(logits: torch.Tensor, labels: torch.Tensor, n_way: int,
                      instances: tuple[int, ...] = PAPER_INSTANCES) -> dict[int, torch.Tensor]:
    """Accuracy per presentation, per sequence: {k: (B,) float, the fraction of the k-th instances of the
    sequence's classes that were predicted right} for each k in ``instances`` that the sequences reach (a
    k no item has is left out).  logits (B, L, n_way), labels (B, L)."""
    inst = instance_numbers(labels, n_way)
    right = (logits.argmax(-1) == labels).to(torch.float64)
    out = {}
    for k in instances:
        at_k = (inst == k).to(torch.float64)
        count = at_k.sum(1)
        if bool((count > 0).all()):
            out[k] = (right * at_k).sum(1) / count
    return out
