"""Omniglot's Lake split (``data.split_scheme=lake``) and within-alphabet episodes (``data.within_alphabet=true``):
the class-group draw of the sampler on tiny splits, and the real data when ../shared/data/omniglot is there."""

from __future__ import annotations

import pytest
import torch

from fewshot_runner.data.base import ClassSplit
from fewshot_runner.data.omniglot import Omniglot, alphabet_groups, load_split_names
from fewshot_runner.data.sampler import EpisodeSampler
from fewshot_runner.errors import DataError


def grouped_split(sizes=(2, 5, 3, 6), per_class=4):
    """Classes in groups of the given sizes (group g holds the next sizes[g] class ids); each image holds its
    class id in every pixel."""
    groups = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    n = len(groups)
    labels = torch.arange(n).repeat_interleave(per_class)
    return ClassSplit("test", labels.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone(), labels,
                      [f"c{i}" for i in range(n)], class_groups=groups)


def drawn_classes(ep) -> torch.Tensor:
    """(T, n_way) class ids of a batch of episodes, by label."""
    ids = ep.support_x[:, :, 0, 0, 0]
    return torch.stack([ids[t][ep.support_y[t].argsort(stable=True)] for t in range(ids.shape[0])])


# ----------------------------------------------------------------------------- the sampler's group draw
def test_grouped_episodes_take_every_class_from_one_group_big_enough():
    split = grouped_split()
    ep = EpisodeSampler(split, n_way=3, n_shot=1, n_query=2, seed=0).sample(400)
    classes = drawn_classes(ep)
    groups = split.class_groups[classes]  # (T, 3)
    assert (groups == groups[:, :1]).all()  # one group per episode
    assert set(groups[:, 0].tolist()) == {1, 2, 3}  # group 0 (2 classes) cannot serve 3-way, the others all do
    counts = torch.bincount(groups[:, 0], minlength=4)[1:].double()
    assert (counts / 400 - 1 / 3).abs().max() < 0.08  # uniform over the eligible groups
    assert all(len(set(c.tolist())) == 3 for c in classes)
    q_ids = ep.query_x[:, :, 0, 0, 0]
    for t in range(5):  # queries under the label of their own class
        for lab in range(3):
            assert set(q_ids[t][ep.query_y[t] == lab].tolist()) == {int(classes[t, lab])}


def test_grouped_draw_reaches_every_class_of_a_group():
    split = grouped_split()
    classes = drawn_classes(EpisodeSampler(split, 3, 1, 1, seed=1).sample(300))
    assert set(classes[split.class_groups[classes[:, 0]] == 3].flatten().tolist()) == set(range(10, 16))


def test_n_way_beyond_the_largest_group_is_one_line():
    with pytest.raises(DataError, match=r"data.n_way=7 .* largest group .*within_alphabet=false"):
        EpisodeSampler(grouped_split(), n_way=7, n_shot=1, n_query=1, seed=0)
    EpisodeSampler(grouped_split(), n_way=6, n_shot=1, n_query=1, seed=0)  # the largest group: fine


def test_ungrouped_draw_is_bit_identical_to_the_former_sampler():
    """Without class groups the draw is the former code's, written out here: the same generator calls."""
    split = ClassSplit("t", torch.zeros(60, 1, 1, 1), torch.arange(12).repeat_interleave(5), list("abcdefghijkl"))
    sampler = EpisodeSampler(split, 4, 2, 3, seed=3)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        classes = torch.rand(7, 12, generator=g).argsort(dim=1)[:, :4]
        keys = torch.rand(7, 4, split.index.shape[1], generator=g)
        expected = torch.gather(split.index[classes], 2, keys.argsort(dim=2)[:, :, :5])
        assert torch.equal(sampler.draw(7), expected)


def test_class_groups_must_match_the_classes():
    with pytest.raises(DataError, match="class groups for 3 classes"):
        ClassSplit("x", torch.zeros(3, 1, 1, 1), torch.arange(3), list("abc"), class_groups=torch.zeros(2, dtype=torch.long))


def test_alphabet_groups_number_alphabets_in_sorted_order():
    names = ["Latin/character02/rot000", "Greek/character01/rot090", "Latin/character01/rot000"]
    assert alphabet_groups(names).tolist() == [1, 0, 1]


# ----------------------------------------------------------------------------- the shipped split files
def test_lake_split_files_hold_upright_characters_of_disjoint_alphabets():
    names = load_split_names("lake")
    assert {k: len(v) for k, v in names.items()} == {"train": 732, "val": 232, "test": 659, "trainval": 964}
    assert names["trainval"] == names["train"] + names["val"]
    assert all(n.endswith("/rot000") for v in names.values() for n in v)  # no rotations as classes
    alphabets = {k: {n.split("/")[0] for n in v} for k, v in names.items()}
    assert (len(alphabets["train"]), len(alphabets["val"]), len(alphabets["test"])) == (24, 6, 20)
    assert not (alphabets["train"] & alphabets["val"] or alphabets["trainval"] & alphabets["test"])


# ----------------------------------------------------------------------------- the real data
@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    from conftest import real_data_root

    root = real_data_root()
    if root is None:
        pytest.skip("no Omniglot copy: put it in ../shared/data/omniglot or set FEWSHOT_DATA")
    return root / "omniglot", Omniglot(root=str(root / "omniglot"), split_scheme="lake", within_alphabet=True)


def _zip_characters(root, set_name: str) -> set[str]:
    import zipfile

    with zipfile.ZipFile(root / f"{set_name}.zip") as z:
        return {"/".join(n.split("/")[1:3]) for n in z.namelist() if n.count("/") == 3 and n.endswith(".png")}


def test_real_lake_split_is_background_for_training_and_evaluation_for_the_test(lake):
    root, ds = lake
    assert {s: ds.split(s).n_classes for s in ("train", "val", "test", "trainval")} == {
        "train": 732, "val": 232, "test": 659, "trainval": 964}
    for s in ("train", "val", "test"):
        assert ds.split(s).x_shape == (1, 28, 28) and ds.split(s).min_per_class == int(ds.split(s).counts.max()) == 20
    chars = {s: {n.rsplit("/", 1)[0] for n in ds.split(s).class_names} for s in ("train", "val", "test")}
    assert chars["train"] | chars["val"] == _zip_characters(root, "images_background")  # 30 alphabets, 964
    assert chars["test"] == _zip_characters(root, "images_evaluation")  # 20 alphabets, 659
    alphabets = {s: {c.split("/")[0] for c in v} for s, v in chars.items()}
    assert len(alphabets["train"] | alphabets["val"]) == 30 and len(alphabets["test"]) == 20
    assert not (alphabets["test"] & (alphabets["train"] | alphabets["val"]) or alphabets["train"] & alphabets["val"])


def test_real_within_alphabet_test_episodes_stay_in_one_alphabet(lake):
    _, ds = lake
    assert ds.split("train").class_groups is None  # training episodes draw from every training class
    for name, n_episodes in (("test", 200), ("val", 60)):
        split = ds.split(name)
        items = EpisodeSampler(split, 20, 1, 1, seed=5).draw(n_episodes)  # (T, 20, 2) item indices
        classes = split.labels[items[:, :, 0]]
        assert torch.equal(split.labels[items[:, :, 1]], classes)
        seen = set()
        for row in classes.tolist():
            alphabets = {split.class_names[c].split("/")[0] for c in row}
            assert len(alphabets) == 1 and len(set(row)) == 20
            seen |= alphabets
        assert len(seen) == (20 if name == "test" else 6)  # every alphabet has >= 20 characters: all are drawn


def test_real_lake_config_composes_and_vinyals_default_is_unchanged(compose_cfg):
    cfg = compose_cfg(["data.split_scheme=lake", "data.within_alphabet=true"])
    assert cfg.data.split_scheme == "lake" and cfg.data.within_alphabet is True
    default = compose_cfg([])
    assert default.data.split_scheme == "vinyals" and default.data.within_alphabet is False


def test_unknown_scheme_lists_only_omniglots_schemes():
    """data/splits/ also holds other data sets' class lists (miniimagenet, cub, ...): not Omniglot schemes."""
    with pytest.raises(DataError, match=r"split scheme 'nope': use data.split_scheme=lake or maml or vinyals$"):
        load_split_names("nope")
