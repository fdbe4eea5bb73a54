"""Batch sources for learners that do not train on episodes (ClassBatchSampler, PairSampler) and
their batch objects (LabelledBatch, PairBatch), plus Episode.map_inputs."""

from __future__ import annotations

import pytest
import torch

from fewshot_runner.data.base import ClassSplit
from fewshot_runner.data.batches import ClassBatchSampler, PairSampler
from fewshot_runner.episode import Episode, LabelledBatch, PairBatch
from fewshot_runner.errors import DataError


def id_split(n_classes=7, per_class=5, offset=0, name="train", counts=None) -> ClassSplit:
    """Each image holds its item id + offset in every pixel (so the id tells its class)."""
    counts = counts or [per_class] * n_classes
    labels = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    ids = torch.arange(len(labels)) + offset
    return ClassSplit(name, ids.view(-1, 1, 1, 1).expand(-1, 1, 2, 3).to(torch.uint8).clone(), labels,
                      [f"{name}{c}" for c in range(len(counts))])


def _ids(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0, 0, 0].long()


# ----------------------------------------------------------------------------- ClassBatchSampler
def test_class_batches_are_deterministic_per_seed():
    split = id_split()
    a, b, c = ClassBatchSampler(split, 4), ClassBatchSampler(split, 4), ClassBatchSampler(split, 5)
    xa, xb, xc = a.sample(9), b.sample(9), c.sample(9)
    assert torch.equal(xa.x, xb.x) and torch.equal(xa.y, xb.y)
    assert not torch.equal(xa.x, xc.x)


def test_class_batches_see_only_their_split_with_the_right_labels():
    val = id_split(4, 6, offset=100, name="val")
    batch = ClassBatchSampler(val, 0).sample(24)
    assert isinstance(batch, LabelledBatch) and batch.n_classes == 4
    assert batch.x.shape == (24, 1, 2, 3) and batch.x.dtype == torch.uint8 and batch.y.dtype == torch.long
    ids = _ids(batch.x) - 100
    assert ids.min() >= 0 and ids.max() < 24
    assert torch.equal(batch.y, val.labels[ids])


def test_class_batches_run_through_every_item_once_per_epoch_across_batch_edges():
    split = id_split(3, 4, counts=[3, 5, 4])  # 12 items, uneven classes
    s = ClassBatchSampler(split, 1)
    ids = torch.cat([_ids(s.sample(5).x) for _ in range(5)])  # 25 items: two epochs and one more
    assert sorted(ids[:12].tolist()) == list(range(12)) and sorted(ids[12:24].tolist()) == list(range(12))
    assert s.epoch == 2


def test_class_batch_sampler_restores_from_its_state_dict_mid_epoch_and_at_an_edge():
    split = id_split(5, 4)  # 20 items
    for skip in (3, 4):  # 3 x 5 items: mid-epoch; 4 x 5: exactly at the epoch's end
        s = ClassBatchSampler(split, 2)
        for _ in range(skip):
            s.sample(5)
        state = s.state_dict()
        after = [s.sample(7) for _ in range(4)]
        r = ClassBatchSampler(split, 99)
        r.load_state_dict(state)
        assert all(torch.equal(a.x, r.sample(7).x) for a in after)


# ----------------------------------------------------------------------------- PairSampler
def test_pair_labels_say_whether_both_images_share_a_class():
    split = id_split(6, 4, counts=[2, 4, 3, 4, 5, 2])
    for n in (1, 2, 9, 64):
        batch = PairSampler(split, n).sample(n)
        assert isinstance(batch, PairBatch) and batch.same.dtype == torch.float32
        assert batch.x1.shape == batch.x2.shape == (n, 1, 2, 3)
        i1, i2 = _ids(batch.x1), _ids(batch.x2)
        same_class = split.labels[i1] == split.labels[i2]
        assert torch.equal(batch.same, same_class.float())
        assert int(batch.same.sum()) == n // 2  # half same (the odd one out is a different pair)
        assert (i1 != i2).all()  # a same pair is two distinct images


def test_pairs_are_deterministic_per_seed_cover_the_split_and_restore():
    split = id_split(5, 3, offset=50)
    a, b = PairSampler(split, 7), PairSampler(split, 7)
    first = a.sample(200)
    assert torch.equal(first.x1, b.sample(200).x1)
    ids = torch.cat([_ids(first.x1), _ids(first.x2)]) - 50
    assert ids.min() >= 0 and ids.max() < 15 and len(set(ids.tolist())) == 15  # every image, nothing else
    state = a.state_dict()
    nxt = a.sample(10)
    c = PairSampler(split, 0)
    c.load_state_dict(state)
    again = c.sample(10)
    assert torch.equal(nxt.x1, again.x1) and torch.equal(nxt.x2, again.x2) and torch.equal(nxt.same, again.same)


def test_pairs_need_two_classes_and_two_images_each():
    with pytest.raises(DataError, match="at least 2 classes"):
        PairSampler(id_split(1, 4), 0)
    with pytest.raises(DataError, match="at least 2 images in every class"):
        PairSampler(id_split(3, counts=[3, 1, 3]), 0)
    with pytest.raises(DataError, match="batch size"):
        ClassBatchSampler(id_split(), 0).sample(0)


# ----------------------------------------------------------------------------- the batch objects
def _u8(*shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_batches_move_like_episodes_uint8_to_float_in_0_1():
    x, x2 = _u8(4, 1, 3, 3), _u8(4, 1, 3, 3, seed=1)
    lb = LabelledBatch(x, torch.tensor([0, 2, 1, 2]), 3).to("cpu", torch.float64)
    assert lb.x.dtype == torch.float64 and torch.equal(lb.x, x.double() / 255) and lb.y.dtype == torch.long
    assert lb.n_classes == 3
    pb = PairBatch(x, x2, torch.tensor([1.0, 0.0, 1.0, 0.0])).to("cpu", torch.float64)
    assert torch.equal(pb.x1, x.double() / 255) and torch.equal(pb.x2, x2.double() / 255)
    assert pb.same.dtype == torch.float64
    ep = Episode(x, torch.zeros(4, dtype=torch.long), x2, torch.zeros(4, dtype=torch.long), 1).to("cpu")
    assert torch.equal(LabelledBatch(x, lb.y, 3).to("cpu").x, ep.support_x)  # the same conversion as Episode.to


def test_map_inputs_transforms_every_image_tensor_and_no_label():
    def fn(t):
        return t * 2

    x = torch.rand(2, 3, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(3).repeat(2, 1)
    ep = Episode(x, y, x + 1, y, 3).map_inputs(fn)
    assert torch.equal(ep.support_x, 2 * x) and torch.equal(ep.query_x, 2 * (x + 1))
    assert ep.support_y is y and ep.query_y is y and ep.n_way == 3
    y0 = y[0]
    lb = LabelledBatch(x[0], y0, 3).map_inputs(fn)
    assert torch.equal(lb.x, 2 * x[0]) and lb.y is y0
    same = torch.ones(3)
    pb = PairBatch(x[0], x[1], same).map_inputs(fn)
    assert torch.equal(pb.x1, 2 * x[0]) and torch.equal(pb.x2, 2 * x[1]) and pb.same is same


@pytest.mark.gpu
def test_batches_pin_and_move_to_cuda():
    x = _u8(4, 1, 3, 3)
    lb = LabelledBatch(x, torch.arange(4), 4).pin_memory()
    pb = PairBatch(x, x, torch.ones(4)).pin_memory()
    assert lb.x.is_pinned() and lb.y.is_pinned() and pb.x1.is_pinned() and pb.same.is_pinned()
    moved = lb.to("cuda", non_blocking=True)
    assert moved.x.is_cuda and torch.equal(moved.x.cpu(), x.float() / 255)
