import pytest
import torch

from fewshot_runner.data.base import ClassSplit
from fewshot_runner.data.sampler import EpisodeSampler, fixed_episodes
from fewshot_runner.errors import DataError


def make_split(n_classes=12, per_class=10, name="train", offset=0):
    # each image holds its global id in every pixel: the id tells which class and item it is
    ids = torch.arange(n_classes * per_class) + offset
    images = ids.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    return ClassSplit(name, images, torch.arange(n_classes).repeat_interleave(per_class),
                      [f"{name}{c}" for c in range(n_classes)])


def test_episode_classes_disjoint_support_query_and_labels():
    split = make_split()
    ep = EpisodeSampler(split, n_way=4, n_shot=3, n_query=5, seed=0).sample(8)
    assert ep.support_x.shape == (8, 12, 1, 2, 2) and ep.query_x.shape == (8, 20, 1, 2, 2)
    for t in range(8):
        s_ids = ep.support_x[t, :, 0, 0, 0]
        q_ids = ep.query_x[t, :, 0, 0, 0]
        assert set(s_ids.tolist()).isdisjoint(q_ids.tolist())
        assert len(set(s_ids.tolist()) | set(q_ids.tolist())) == 32  # no repeats
        assert sorted(set(ep.support_y[t].tolist())) == [0, 1, 2, 3]
        # every image sits under the label of its own class, one class per label
        for ids, ys in ((s_ids, ep.support_y[t]), (q_ids, ep.query_y[t])):
            for lab in range(4):
                classes = {int(i) // 10 for i in ids[ys == lab]}
                assert len(classes) == 1
        s_cls = {int(i) // 10 for i in s_ids}
        assert s_cls == {int(i) // 10 for i in q_ids} and len(s_cls) == 4


def test_labels_are_permuted_per_task():
    ep = EpisodeSampler(make_split(), 4, 1, 1, seed=0).sample(32)
    class_of_label0 = {int(ep.support_x[t, 0, 0, 0, 0]) // 10 for t in range(32)}
    assert len(class_of_label0) > 3


def test_same_seed_same_episodes_and_state_roundtrip():
    split = make_split()
    a = EpisodeSampler(split, 5, 1, 2, seed=7)
    b = EpisodeSampler(split, 5, 1, 2, seed=7)
    assert torch.equal(a.sample(4).query_x, b.sample(4).query_x)
    state = a.state_dict()
    x1 = a.sample(3).support_x
    a.load_state_dict(state)
    assert torch.equal(a.sample(3).support_x, x1)
    c = EpisodeSampler(split, 5, 1, 2, seed=8)
    assert not torch.equal(c.sample(4).query_x, EpisodeSampler(split, 5, 1, 2, seed=7).sample(4).query_x)


def test_fixed_episodes_are_reproducible():
    split = make_split()
    blocks = list(fixed_episodes(split, 5, 1, 2, 125, seed=3))
    assert [e.n_tasks for e in blocks] == [50, 50, 25]
    e1 = torch.cat([e.query_x for e in blocks])
    e2 = torch.cat([e.query_x for e in fixed_episodes(split, 5, 1, 2, 125, seed=3)])
    assert e1.shape[0] == 125 and torch.equal(e1, e2)
    # the first episodes of a longer run are the episodes of a shorter one
    e3 = torch.cat([e.query_x for e in fixed_episodes(split, 5, 1, 2, 60, seed=3)])
    assert torch.equal(e3, e1[:60])


def test_classes_come_from_the_split_only():
    val = make_split(6, 10, "val", offset=1000)
    ep = EpisodeSampler(val, 5, 2, 3, seed=0).sample(10)
    assert int(ep.support_x.min()) >= 1000 and int(ep.query_x.min()) >= 1000


def test_uneven_class_sizes_never_sample_padding():
    images = torch.arange(3 + 7 + 5).view(-1, 1, 1, 1).float()
    labels = torch.tensor([0] * 3 + [1] * 7 + [2] * 5)
    split = ClassSplit("train", images, labels, ["a", "b", "c"])
    ep = EpisodeSampler(split, 3, 1, 2, seed=0).sample(50)
    for t in range(50):
        ids = torch.cat([ep.support_x[t].flatten(), ep.query_x[t].flatten()]).long()
        assert len(set(ids.tolist())) == 9 and all(labels[i] in (0, 1, 2) for i in ids)


def test_too_many_ways_or_shots_is_a_clear_error():
    split = make_split(12, 10)
    with pytest.raises(DataError, match="n_way=20 is larger than the 12 classes"):
        EpisodeSampler(split, 20, 1, 1, seed=0)
    with pytest.raises(DataError, match="more than the 10 images per class"):
        EpisodeSampler(split, 5, 5, 6, seed=0)


def _uneven_split():
    labels = torch.tensor([0] * 3 + [1] * 7 + [2] * 5 + [3] * 4)
    return ClassSplit("train", torch.arange(19).view(-1, 1, 1, 1), labels, list("abcd"))


@pytest.mark.parametrize("make, shape, checksum, first", [
    (make_split, (4, 2, 3), 4836760, [86, 81, 57, 53, 18, 11, 63, 65, 109, 102, 68, 64, 5, 7, 96, 90]),
    (_uneven_split, (3, 1, 2), 10125, [9, 18, 2, 7, 12, 17, 1, 18, 11]),
])
def test_episodes_for_a_seed_are_those_of_the_sampler_before_draw_and_gather(make, shape, checksum, first):
    """Pinned from the sampler as it was before ``sample`` became ``gather(draw(n))``: the same seed
    still gives bitwise the same episodes (uniform and uneven class sizes)."""
    s = EpisodeSampler(make(), *shape, seed=5)
    e1, e2 = s.sample(3), s.sample(2)
    ids = torch.cat([e1.support_x.flatten(), e1.query_x.flatten(), e2.support_x.flatten(), e2.query_x.flatten()]).long()
    assert int((ids * torch.arange(1, ids.numel() + 1)).sum()) == checksum
    assert e1.support_x[:, :, 0, 0, 0].flatten().tolist()[:16] == first


def test_sample_is_gather_of_draw():
    split = make_split()
    a, b = EpisodeSampler(split, 4, 2, 3, seed=1), EpisodeSampler(split, 4, 2, 3, seed=1)
    items = b.draw(6)
    assert items.shape == (6, 4, 5) and items.dtype == torch.long
    ep, ep2 = a.sample(6), b.gather(items)
    for f in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(ep, f), getattr(ep2, f))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())  # gather draws nothing
