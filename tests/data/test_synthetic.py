"""Synthetic data set: shapes, determinism, disjoint splits, speed, learnable structure."""

from __future__ import annotations

import time

import pytest
import torch

from fewshot_runner.data.base import EpisodicDataset
from fewshot_runner.data.synthetic import Synthetic
from fewshot_runner.errors import DataError


def test_synthetic_shapes_and_dtype():
    ds = Synthetic(n_classes_train=6, n_classes_val=3, n_classes_test=4, per_class=5, image_size=16, channels=3)
    assert isinstance(ds, EpisodicDataset) and ds.name == "synthetic"
    assert {s: ds.split(s).n_classes for s in ("train", "val", "test")} == {"train": 6, "val": 3, "test": 4}
    for s in ("train", "val", "test"):
        split = ds.split(s)
        assert split.images.dtype == torch.uint8 and split.x_shape == (3, 16, 16)
        assert split.images.shape[0] == split.n_classes * 5 and split.min_per_class == 5
    assert ds.x_shape == (3, 16, 16)


def test_synthetic_defaults_are_fast_and_match_the_config():
    t0 = time.perf_counter()
    ds = Synthetic()
    assert time.perf_counter() - t0 < 0.5
    assert {s: ds.split(s).n_classes for s in ("train", "val", "test")} == {"train": 64, "val": 16, "test": 20}
    assert ds.x_shape == (1, 28, 28) and ds.split("train").min_per_class == 20


def test_synthetic_is_deterministic_by_seed():
    a, b, c = Synthetic(seed=3), Synthetic(seed=3), Synthetic(seed=4)
    for s in ("train", "val", "test"):
        assert torch.equal(a.split(s).images, b.split(s).images)
        assert torch.equal(a.split(s).labels, b.split(s).labels)
    assert not torch.equal(a.split("train").images, c.split("train").images)


def test_synthetic_splits_have_disjoint_classes():
    ds = Synthetic(n_classes_train=10, n_classes_val=5, n_classes_test=7)
    names = [set(ds.split(s).class_names) for s in ("train", "val", "test")]
    assert sum(map(len, names)) == len(set().union(*names)) == 22
    # and the classes are really different images, not relabelled copies
    means = [ds.split(s).images.float().view(ds.split(s).n_classes, -1, 28 * 28).mean(1) for s in ("train", "val", "test")]
    assert torch.cdist(means[0], means[2]).min() > 100


def test_synthetic_classes_are_separable_but_noisy():
    """Images of a class sit closer to their own class mean than to others' (so a few-shot
    learner beats chance), but are not identical copies."""
    split = Synthetic(n_classes_train=20, per_class=10).split("train")
    x = split.images.float().view(20, 10, -1)
    assert not torch.equal(x[:, 0], x[:, 1])
    centroids = x[:, :5].mean(1)  # 5-shot prototypes
    d = torch.cdist(x[:, 5:].reshape(-1, x.shape[-1]), centroids)
    acc = (d.argmin(1) == torch.arange(20).repeat_interleave(5)).float().mean()
    assert acc > 0.8


@pytest.mark.parametrize("bad", [{"per_class": 0}, {"image_size": -1}, {"n_classes_val": 1.5}, {"seed": "x"}])
def test_synthetic_rejects_bad_arguments(bad):
    with pytest.raises(DataError):
        Synthetic(**bad)
