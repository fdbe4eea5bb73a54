"""miniImageNet on tiny copies in its two published layouts (pickled caches; images/ + csv), written here."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from tiny_copies import colour, tiny_names, write_mini_folder, write_mini_pickles, write_split_dir

from fewshot_runner.data.miniimagenet import MiniImageNet
from fewshot_runner.data.published import Expect
from fewshot_runner.data.sampler import EpisodeSampler
from fewshot_runner.errors import DataError

NAMES = tiny_names("miniimagenet", 2)  # the first two wnids of each shipped split
ORDER = [c for s in ("train", "val", "test") for c in NAMES[s]]


@pytest.fixture
def split_dir(tmp_path):
    return write_split_dir(tmp_path / "split", NAMES)


def _all(split) -> torch.Tensor:
    return split.images[torch.arange(split.images.shape[0])]


def _colours(split) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in im[:, 40, 40]) for im in _all(split)]


def test_pickled_caches_give_the_split_classes_labels_and_images(tmp_path, split_dir):
    d = MiniImageNet(str(write_mini_pickles(tmp_path / "mini", NAMES)), split_dir=split_dir, cache_dir=tmp_path / "c")
    assert d.x_shape == (3, 84, 84)
    for s in ("train", "val", "test"):
        split = d.split(s)
        assert split.class_names == NAMES[s] and split.labels.tolist() == [0, 0, 0, 1, 1, 1]
        assert _colours(split) == [colour(ORDER.index(w), i) for w in NAMES[s] for i in range(3)]
    assert d.split("trainval").class_names == NAMES["train"] + NAMES["val"]
    assert d.split_checksum == d.split("test").split_checksum is not None


def test_images_folder_with_csv_gives_the_images_of_the_pickles(tmp_path, split_dir):
    a = MiniImageNet(str(write_mini_pickles(tmp_path / "p", NAMES)), split_dir=split_dir, cache_dir=tmp_path / "c1")
    b = MiniImageNet(str(write_mini_folder(tmp_path / "f", NAMES)), split_dir=split_dir, cache_dir=tmp_path / "c2")
    for s in ("train", "val", "test", "trainval"):
        assert a.split(s).class_names == b.split(s).class_names
        assert torch.equal(a.split(s).labels, b.split(s).labels)
        diff = (_all(a.split(s)).int() - _all(b.split(s)).int()).abs().max()
        assert diff <= 3  # JPEG of a solid colour: within a few levels


def test_other_image_size_is_resized(tmp_path, split_dir):
    d = MiniImageNet(str(write_mini_pickles(tmp_path / "p", NAMES)), image_size=20, split_dir=split_dir,
                     cache_dir=tmp_path / "c")
    assert d.x_shape == (3, 20, 20) and _colours_at(d.split("val"), 5) == [colour(2, 0), colour(2, 1), colour(2, 2)]


def _colours_at(split, y):
    return [tuple(int(v) for v in im[:, y, y]) for im in _all(split)[:3]]


def test_episodes_from_the_copy_are_labelled_by_class(tmp_path, split_dir):
    d = MiniImageNet(str(write_mini_pickles(tmp_path / "p", NAMES)), split_dir=split_dir, cache_dir=tmp_path / "c")
    ep = EpisodeSampler(d.split("trainval"), n_way=3, n_shot=1, n_query=2, seed=0).sample(4)
    assert ep.support_x.shape == (4, 3, 3, 84, 84) and ep.query_x.shape == (4, 6, 3, 84, 84)
    # red channel 12 k + 4 names the class k: one class per label, the same in support and query, 3 distinct
    for t in range(4):
        reds = [{int(r) for r in x[t][y[t] == label, 0, 0, 0]} for label in range(3)
                for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y))]
        assert all(len(r) == 1 for r in reds)
        per_label = [reds[2 * label] | reds[2 * label + 1] for label in range(3)]
        assert all(len(r) == 1 for r in per_label) and len(set.union(*per_label)) == 3


def test_shipped_split_refuses_the_tiny_copy_in_one_line(tmp_path):
    root = write_mini_pickles(tmp_path / "p", NAMES)
    with pytest.raises(DataError) as e:
        MiniImageNet(str(root), cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "\n" not in msg and "has no class n01704323 of the train split (94 of 100 split classes missing)" in msg
    assert "mini-imagenet-cache-{train,val,test}.pkl" in msg


def test_partial_copy_is_refused_by_images_per_class(tmp_path, split_dir):
    root = write_mini_folder(tmp_path / "f", NAMES)
    os.unlink(root / "images" / f"{NAMES['val'][1]}00000003.jpg")
    rows = (root / "val.csv").read_text().splitlines()
    (root / "val.csv").write_text("\n".join(r for r in rows if not r.startswith(f"{NAMES['val'][1]}00000003")) + "\n")
    with pytest.raises(DataError, match=f"class {NAMES['val'][1]} has 2 images where miniImageNet has 3 per class"):
        MiniImageNet(str(root), split_dir=split_dir, expect=Expect(per_class=3), cache_dir=tmp_path / "c")


def test_image_listed_but_absent_is_named(tmp_path, split_dir):
    root = write_mini_folder(tmp_path / "f", NAMES)
    os.unlink(root / "images" / f"{NAMES['test'][0]}00000002.jpg")
    with pytest.raises(DataError, match=rf"images lacks {NAMES['test'][0]}00000002.jpg \(1 of the images"):
        MiniImageNet(str(root), split_dir=split_dir, cache_dir=tmp_path / "c")


def test_missing_files_say_which_and_where_they_come_from(tmp_path, split_dir):
    with pytest.raises(DataError, match=r"no miniImageNet data under .*nothing \(the folder does not exist\): get "
                                        r"mini-imagenet-cache"):
        MiniImageNet(str(tmp_path / "nothing"), split_dir=split_dir)
    root = write_mini_pickles(tmp_path / "p", NAMES)
    os.unlink(root / "mini-imagenet-cache-val.pkl")
    with pytest.raises(DataError, match=r"lacks .*mini-imagenet-cache-val.pkl \(1 of 3 files missing\)"):
        MiniImageNet(str(root), split_dir=split_dir)


@pytest.mark.parametrize("content, message", [
    (["not", "a", "dict"], r"holds list, not a dict with image_data and class_dict"),
    ({"image_data": np.zeros((2, 84, 84, 3), np.float32), "class_dict": {}}, r"image_data is float32 \(2, 84, 84, 3\)"),
    ({"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n01532829": [0, 5]}}, r"names row 5 of 2 images"),
])
def test_pickle_of_another_layout_is_refused_in_one_line(tmp_path, split_dir, content, message):
    root = write_mini_pickles(tmp_path / "p", NAMES)
    (root / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=message) as e:
        MiniImageNet(str(root), split_dir=split_dir, cache_dir=tmp_path / "c")
    assert "mini-imagenet-cache-train.pkl" in str(e.value) and "\n" not in str(e.value)


def test_csv_without_its_header_is_refused(tmp_path, split_dir):
    root = write_mini_folder(tmp_path / "f", NAMES)
    (root / "test.csv").write_text("a.jpg,n01930112\n")
    with pytest.raises(DataError, match=r"test.csv does not start with the header filename,label"):
        MiniImageNet(str(root), split_dir=split_dir)


def test_bad_image_size_is_one_line():
    with pytest.raises(DataError, match=r"data.image_size must be a positive integer \(got 0\)"):
        MiniImageNet(image_size=0)
