"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot Classification", 2019).

Training: ordinary mini-batches of the training split's images with their class ids
(``data.batches.ClassBatchSampler``), the backbone followed by a classifier over all the split's classes,
cross-entropy.  Baseline's classifier is linear; Baseline++'s is cosine: ``scale * g_c * cos(z, v_c)`` with a
weight-normalised class vector ``w_c = g_c v_c / ||v_c||`` (``g_c`` learned, starting at ``||v_c||``, as
``torch.nn.utils.weight_norm`` in the authors' code) on the normalised feature ``z / (||z|| + 1e-5)``.

Test: the backbone is frozen; for each episode a new classifier of the same kind (``n_way`` classes) is fitted
on the support features only, as the authors' code does: 100 epochs over the support set in random mini-batches
of 4, SGD (lr 0.01, momentum 0.9, dampening 0.9, weight decay 0.001), then the queries are classified.
The fit is batched over the tasks of a block (independent per-task problems; one optimizer over (T, ...)
tensors is T independent optimizers) and deterministic: its random numbers (the initial head and the
mini-batch order) come from a generator seeded with ``algo.fit_seed`` at every call, the same for every task,
so a task's result does not depend on which other tasks share its block.

The training head's width is the training split's number of classes: it is sized in :meth:`batch_source` (which
sees the split) before any step, and takes the checkpoint's size when a state dict is loaded (``fewshot eval``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.algorithms.base import MetaLearner, accuracy
from fewshot_runner.episode import Episode, LabelledBatch
from fewshot_runner.errors import UserError

NORM_EPS = 1e-5  # z / (||z|| + eps), as the authors' distLinear


def chen_scale(n_classes: int) -> float:
    """The authors' fixed cosine scale: 2 for up to 200 classes, 10 above (Omniglot's thousands of classes)."""
    return 2.0 if n_classes <= 200 else 10.0


def cosine_logits(z: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """Baseline++'s scores ``scale * g_c * <z / (||z|| + eps), v_c / ||v_c||>``.

    z (..., N, D) features; v (..., C, D) class directions; g (..., C) class norms -> (..., N, C).
    """
    z_n = z / (z.norm(dim=-1, keepdim=True) + NORM_EPS)
    w = g.unsqueeze(-1) * v / v.norm(dim=-1, keepdim=True)
    return scale * z_n @ w.transpose(-1, -2)


def linear_logits(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Baseline's scores ``z @ w.T + b``: z (..., N, D), w (..., C, D), b (..., C) -> (..., N, C)."""
    return z @ w.transpose(-1, -2) + b.unsqueeze(-2)


def init_head(cosine: bool, shape: tuple[int, ...], generator: torch.Generator | None = None,
              dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A fresh head's tensors, as ``nn.Linear``'s default init: w uniform in +-1/sqrt(D); shape (..., C, D).

    Linear: {"w", "b"} (b uniform in +-1/sqrt(D), as nn.Linear); cosine: {"v", "g"} with g = ||v_c||
    (weight norm's start: the head starts as the plain linear map without bias).
    """
    bound = 1.0 / math.sqrt(shape[-1])
    w = (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound
    if cosine:
        return {"v": w, "g": w.norm(dim=-1)}
    return {"w": w, "b": (torch.rand(shape[:-1], generator=generator, dtype=dtype) * 2 - 1) * bound}


def head_logits(z: torch.Tensor, head: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """The head's scores: cosine (``v``, ``g``) or linear (``w``, ``b``); z (..., N, D) -> (..., N, C)."""
    if "v" in head:
        return cosine_logits(z, head["v"], head["g"], scale)
    return linear_logits(z, head["w"], head["b"])


def fit_heads(support_z: torch.Tensor, support_y: torch.Tensor, n_way: int, cosine: bool, scale: float,
              epochs: int = 100, batch_size: int = 4, lr: float = 0.01, momentum: float = 0.9,
              dampening: float = 0.9, weight_decay: float = 0.001, seed: int = 0) -> dict[str, torch.Tensor]:
    """One new head per task, fitted on its support features only (the authors' ``set_forward_adaptation``).

    support_z (T, S, D) (no graph needed), support_y (T, S) in 0..n_way-1.  Each epoch visits the support
    set in a random order, in mini-batches of ``batch_size`` (the last one smaller), one SGD step each, on the
    batch's mean cross-entropy.  Returns the heads' tensors, each with a leading T (``init_head``'s keys).
    All tasks share the initial head and the order (one generator seeded with ``seed``).
    """
    T, S, D = support_z.shape
    g = torch.Generator().manual_seed(seed)
    z = support_z.detach()
    init = init_head(cosine, (n_way, D), generator=g, dtype=torch.float64)
    params = [nn.Parameter(t.to(z.dtype).to(z.device).expand(T, *t.shape).clone()) for t in init.values()]
    names = list(init)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(S, generator=g).to(z.device)
            for i in range(0, S, batch_size):
                idx = order[i:i + batch_size]
                logits = head_logits(z[:, idx], dict(zip(names, params)), scale)  # (T, b, n_way)
                # the sum over tasks of each task's mean loss: each task's gradient is its own mean's
                loss = F.cross_entropy(logits.flatten(0, 1), support_y[:, idx].flatten(), reduction="sum") / len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return {k: p.detach() for k, p in zip(names, params)}


class Baseline(MetaLearner):
    """Chen et al.'s Baseline: a linear classifier over the training classes; a new one per test episode.

    Batch norm (training mode) spans the mini-batch, so ``independent_tasks`` stays False.  Any ``n_way`` at
    test time (the test head is fitted per episode).
    """

    cosine = False
    eval_settings = ("fit_epochs", "fit_batch", "fit_lr", "fit_seed")

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, scale: float | None = None,
                 fit_epochs: int = 100, fit_batch: int = 4, fit_lr: float = 0.01, fit_seed: int = 0) -> None:
        super().__init__()
        for key, v in (("fit_epochs", fit_epochs), ("fit_batch", fit_batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"algo.{key} must be a positive integer (got {v!r})")
        if not (fit_lr > 0 and math.isfinite(fit_lr)):
            raise UserError(f"algo.fit_lr must be a positive number (got {fit_lr!r})")
        if scale is not None and not (scale > 0 and math.isfinite(scale)):
            raise UserError(f"algo.scale must be a positive number or null (got {scale!r})")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.scale = scale
        self.fit_epochs, self.fit_batch, self.fit_lr, self.fit_seed = fit_epochs, fit_batch, fit_lr, fit_seed
        # the training classifier: 0 classes until batch_source (or a loaded state dict) sizes it
        self.head = nn.ParameterDict({k: nn.Parameter(t) for k, t in init_head(self.cosine, (0, feature_dim)).items()})
        if not self.cosine:
            self.head["b"].data.zero_()  # the authors start the training head's bias at 0

    # ------------------------------------------------------------------ the training head
    @property
    def n_classes(self) -> int:
        """Width of the training classifier (0 before it is sized)."""
        return next(iter(self.head.values())).shape[0]

    def train_scale(self) -> float:
        return self.scale if self.scale is not None else chen_scale(self.n_classes)

    def size_head(self, n_classes: int) -> None:
        """Give the training classifier ``n_classes`` outputs (fresh weights), keeping its Parameter objects (the
        optimizer, built before, holds them; it has no state before the first step)."""
        if n_classes == self.n_classes:
            return
        p = next(iter(self.head.values()))
        fresh = init_head(self.cosine, (n_classes, self.feature_dim), dtype=p.dtype)
        if not self.cosine:
            fresh["b"].zero_()
        for k, t in fresh.items():
            self.head[k].data = t.to(p.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = f"{prefix}head.{next(iter(self.head))}"
        if key in state_dict:  # a checkpoint's training head: take its width (fewshot eval builds no source)
            self.size_head(int(state_dict[key].shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ training
    def batch_source(self, split, n_way: int, n_shot: int, n_query: int, seed: int):
        """Class-labelled mini-batches of the training split (``train.meta_batch_size`` images per step); sizes
        the classifier to the split's classes."""
        from fewshot_runner.data.batches import ClassBatchSampler

        self.size_head(split.n_classes)
        return ClassBatchSampler(split, seed=seed)

    def meta_loss(self, batch: LabelledBatch):
        if not isinstance(batch, LabelledBatch):
            raise UserError(f"{type(self).__name__} trains on class-labelled mini-batches, not {type(batch).__name__}; "
                            f"its batch_source gives them (data.batches.ClassBatchSampler)")
        if batch.n_classes != self.n_classes:
            raise UserError(f"the training batch has {batch.n_classes} classes but {type(self).__name__}'s classifier "
                            f"has {self.n_classes}: resume with the data settings of the original run")
        logits = head_logits(self.backbone(batch.x), dict(self.head), self.train_scale())
        loss = F.cross_entropy(logits, batch.y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits.detach(), batch.y)}

    # ------------------------------------------------------------------ evaluation
    def embed_episode(self, episodes: Episode) -> dict[str, torch.Tensor]:
        """Frozen-backbone features: support (T, S, D) and query (T, Q, D), from one pass."""
        T, S = episodes.support_x.shape[:2]
        x = torch.cat([episodes.support_x, episodes.query_x], dim=1).flatten(0, 1)
        z = self.backbone(x).view(T, -1, self.feature_dim)
        return {"support": z[:, :S], "query": z[:, S:]}

    def predict(self, episodes: Episode) -> torch.Tensor:
        """Logits (T, Q, n_way) of a head fitted on each task's support features alone (``fit_heads``)."""
        with torch.no_grad():
            z = self.embed_episode(episodes)
        support_z, query_z = (t if t.dtype == torch.float64 else t.float() for t in (z["support"], z["query"]))
        scale = self.scale if self.scale is not None else chen_scale(episodes.n_way)
        with torch.autocast(support_z.device.type, enabled=False):  # (the fit in fp32, or fp64, under autocast too)
            heads = fit_heads(support_z, episodes.support_y, episodes.n_way, self.cosine, scale,
                              epochs=self.fit_epochs, batch_size=self.fit_batch, lr=self.fit_lr, seed=self.fit_seed)
            return head_logits(query_z, heads, scale)


class BaselinePlusPlus(Baseline):
    """Chen et al.'s Baseline++: Baseline with cosine classifiers (weight-normalised class vectors, a fixed
    scale) in training and at test time."""

    cosine = True
