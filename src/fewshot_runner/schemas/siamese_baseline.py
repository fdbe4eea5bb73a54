"""Schemas of the algo group for learners that do not train on episodes: Siamese networks (same/different
pairs) and Baseline / Baseline++ (class-labelled mini-batches over all training classes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fewshot_runner.schemas import register


@register("algo", "siamese")
@dataclass
class SiameseConfig:
    _target_: str = "fewshot_runner.algorithms.siamese.SiameseNetwork"
    embed_dim: Optional[int] = None  # set: Koch's fully connected sigmoid layer of this width after the backbone
    shot_score: str = "max"  # K-shot: a class scores its most similar support image (max) or their mean probability
    # training pairs: sampled (train.meta_batch_size pairs per step, half same-class) or all (the same number of
    # images, 2 x train.meta_batch_size, as whole class-grouped batches of data.train_n_way x (train_n_shot +
    # train_n_query) images, at least one, and every pair within a batch)
    pairs: str = "sampled"


@dataclass
class _BaselineFit:
    fit_epochs: int = 100  # test time: epochs of SGD over the support set for each episode's new classifier
    fit_batch: int = 4  # test time: support images per SGD step
    fit_lr: float = 0.01  # test time: SGD learning rate (momentum 0.9, dampening 0.9, weight decay 0.001)
    fit_seed: int = 0  # test time: seed of the new classifier's initial weights and mini-batch order


@register("algo", "baseline")
@dataclass
class BaselineConfig(_BaselineFit):
    _target_: str = "fewshot_runner.algorithms.baseline.Baseline"


@register("algo", "baselinepp")
@dataclass
class BaselinePPConfig(_BaselineFit):
    _target_: str = "fewshot_runner.algorithms.baseline.BaselinePlusPlus"
    # the cosine scale of the training and test heads; null: the authors' rule, 2 for up to 200 classes, 10 above
    scale: Optional[float] = None
