"""The declared learner interface (algorithms/base.py) as the engine uses it: each hook a new learner may
override reaches the loop, through the real ``train()`` on synthetic data.

The learners here are small test doubles of the families that land next (a Baseline-style learner on
class mini-batches, a Reptile-style learner with its own outer step); Hydra instantiates them by
``_target_`` from this module, as it does the package's own learners.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.algorithms.base import MetaLearner, accuracy, cross_entropy
from fewshot_runner.algorithms.protonet import prototypes, squared_euclidean_logits
from fewshot_runner.engine.run import train
from fewshot_runner.errors import UserError

SMOKE = ["debug=smoke", "algo=protonet", "backbone=conv4", "backbone.hidden=8", "logger=none",
         "train.lr_decay_every=null"]
MODULE = Path(__file__).stem
CALLS: list[tuple] = []


class ClassBatchLearner(MetaLearner):
    """Baseline-style: a linear head over all training classes, trained on class-labelled mini-batches
    (the data layer's ClassBatchSampler); tested like ProtoNet (prototypes of the embeddings)."""

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, n_classes: int = 64, **_) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, n_classes)

    def batch_source(self, split, n_way, n_shot, n_query, seed):
        from fewshot_runner.data.batches import ClassBatchSampler

        CALLS.append(("batch_source", split.name, seed))
        return ClassBatchSampler(split, seed=seed)

    def param_groups(self):
        return [{"params": list(self.backbone.parameters())}, {"params": list(self.head.parameters()), "lr": 0.01}]

    def set_progress(self, step, total):
        super().set_progress(step, total)
        CALLS.append(("progress", step, total))

    def meta_loss(self, batch):
        logits = self.head(self.backbone(batch.x))
        loss = F.cross_entropy(logits, batch.y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits.detach(), batch.y)}

    def predict(self, episodes):
        t, s = episodes.support_x.shape[:2]
        z = self.backbone(torch.cat([episodes.support_x, episodes.query_x], 1).flatten(0, 1)).view(t, -1, self.head.in_features)
        return squared_euclidean_logits(z[:, s:], prototypes(z[:, :s], episodes.support_y, episodes.n_way))


class OwnStepLearner(MetaLearner):
    """Reptile-style: its outer update is not a gradient step on meta_loss (outer_step)."""

    independent_tasks = True  # (still refused chunks: its update is its own)

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, **_) -> None:
        super().__init__()
        self.backbone = backbone
        self.steps = 0

    def outer_step(self, batch, optimizer):
        self.steps += 1
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(0.99)  # moves towards 0: an update no optimizer.step() would make
        loss = torch.tensor(1.0 / self.steps)
        CALLS.append(("outer_step", batch.n_tasks))
        return {"loss": float(loss)}

    def predict(self, episodes):
        t, s = episodes.support_x.shape[:2]
        z = self.backbone(torch.cat([episodes.support_x, episodes.query_x], 1).flatten(0, 1)).view(t, -1, 8)
        return squared_euclidean_logits(z[:, s:], prototypes(z[:, :s], episodes.support_y, episodes.n_way))


class MapLearner(OwnStepLearner):
    feature_kind = "map"

    def outer_step(self, batch, optimizer):
        maps = self.backbone.forward_map(batch.support_x.flatten(0, 1))
        CALLS.append(("map", tuple(maps.shape)))
        return {"loss": float(maps.detach().mean())}


def _target(cls) -> str:
    return f"algo._target_={MODULE}.{cls.__name__}"


def test_a_learner_on_class_mini_batches_trains_resumes_bitwise_and_gets_its_groups_and_progress(compose_cfg, tmp_path):
    CALLS.clear()
    cfg = compose_cfg([*SMOKE, _target(ClassBatchLearner), "train.meta_batch_size=16", "train.steps=4",
                       "train.ckpt_every=2"])
    res = train(cfg, run_dir=tmp_path / "whole")
    assert 0 <= res["test/acc"] <= 1
    assert ("batch_source", "train", cfg.seed + 1) in CALLS
    assert [c[1:] for c in CALLS if c[0] == "progress"] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    state = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [cfg.train.outer_lr, 0.01]
    assert state["sampler"]["generator"] is not None  # the class-batch source is checkpointed

    # stopped after 2 steps and resumed to 4: the same weights, optimizer and source state, bit for bit
    train(compose_cfg([*SMOKE, _target(ClassBatchLearner), "train.meta_batch_size=16", "train.steps=2",
                       "train.ckpt_every=2"]), run_dir=tmp_path / "half")
    (tmp_path / "half" / "results.json").unlink()
    train(compose_cfg([*SMOKE, _target(ClassBatchLearner), "train.meta_batch_size=16", "train.steps=4",
                       "train.ckpt_every=2", "resume=auto"]), run_dir=tmp_path / "half")
    again = torch.load(tmp_path / "half" / "checkpoints" / "last.pt", weights_only=False)
    for k in state["model"]:
        assert torch.equal(state["model"][k], again["model"][k]), k
    for a, b in zip(state["optimizer"]["state"].values(), again["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert torch.equal(state["sampler"]["generator"], again["sampler"]["generator"])


def test_a_learner_with_its_own_outer_step_is_stepped_by_it_and_refused_chunks(compose_cfg, tmp_path):
    CALLS.clear()
    cfg = compose_cfg([*SMOKE, _target(OwnStepLearner), "train.steps=3", "train.meta_batch_size=2"])
    train(cfg, run_dir=tmp_path / "r")
    assert [c for c in CALLS if c[0] == "outer_step"] == [("outer_step", 2)] * 3
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert state["optimizer"]["state"] == {}  # the engine never stepped the optimizer
    with pytest.raises(UserError, match="train.task_chunk splits a meta-batch into chunks .*OwnStepLearner"):
        train(compose_cfg([*SMOKE, _target(OwnStepLearner), "train.meta_batch_size=2", "train.task_chunk=1"]),
              run_dir=tmp_path / "chunked")


def test_a_learner_that_compares_feature_maps_gets_them_and_a_flat_backbone_is_refused(compose_cfg, tmp_path):
    CALLS.clear()
    train(compose_cfg([*SMOKE, _target(MapLearner), "train.steps=1"]), run_dir=tmp_path / "conv")
    assert [c for c in CALLS if c[0] == "map"] == [("map", (10, 8, 1, 1))]  # 2 tasks x 5 support, 28 -> 1x1
    with pytest.raises(UserError, match="MapLearner compares feature maps, which MLP does not give"):
        train(compose_cfg(["debug=smoke", "algo=protonet", "logger=none", _target(MapLearner), "backbone=mlp",
                           "train.steps=1"]), run_dir=tmp_path / "mlp")


def test_a_learner_without_compile_support_is_refused_device_compile(compose_cfg, tmp_path):
    with pytest.raises(UserError, match="OwnStepLearner does not support device.compile=true"):
        train(compose_cfg([*SMOKE, _target(OwnStepLearner), "device.compile=true"]), run_dir=tmp_path / "r")


def test_the_optimizer_group_selects_the_outer_optimizer(compose_cfg, tmp_path):
    train(compose_cfg([*SMOKE, "optimizer=sgd", "optimizer.momentum=0.5", "train.steps=2"]), run_dir=tmp_path / "r")
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    group = state["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.5 and "betas" not in group
    assert state["config"]["optimizer"]["_target_"] == "torch.optim.SGD"


def test_the_engine_never_probes_learners_or_tests_their_class_names():
    """Every learner gets the same checks: the engine calls the hooks declared in algorithms/base.py,
    never ``getattr(algo, ...)`` / ``hasattr(algo, ...)`` or a class name in a ``_target_``."""
    engine = Path(__file__).resolve().parents[1] / "src" / "fewshot_runner" / "engine"
    for f in engine.glob("*.py"):
        text = f.read_text()
        assert not re.search(r"(getattr|hasattr)\((algo|learner|self\.algo|run\.algo)\b", text), f.name
        assert not re.search(r"""["'](MAML|Prototypical|ProtoNet)[A-Za-z]*["']\s+in\b""", text), f.name


def test_cross_entropy_and_accuracy_average_over_every_leading_dimension():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 3.0], [0.5, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[0, 1], [0, 0]])
    assert float(accuracy(logits, labels)) == 0.75
    expected = sum(float(-torch.log_softmax(logits[i, j], -1)[labels[i, j]]) for i in range(2) for j in range(2)) / 4
    assert abs(float(cross_entropy(logits, labels)) - expected) < 1e-12


def test_data_workers_gather_the_same_batches_as_the_plain_sampler(compose_cfg, tmp_path):
    """data.workers=2 (the prefetching loader, data/loader.py) trains the very same weights as no workers."""
    plain = [*SMOKE, "train.steps=3", "data.augment.flip=true"]
    train(compose_cfg(plain), run_dir=tmp_path / "plain")
    train(compose_cfg([*plain, "data.workers=2"]), run_dir=tmp_path / "workers")
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "workers" / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
