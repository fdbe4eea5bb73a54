"""tieredImageNet on tiny copies in Ren et al.'s layouts (labels pkl + images npz, or + PNG pickle), written here."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from tiny_copies import colour, tiered_arrays, tiny_names, write_split_dir, write_tiered

from fewshot_runner.data import tieredimagenet as tiered
from fewshot_runner.data.published import Expect
from fewshot_runner.data.tieredimagenet import TieredImageNet
from fewshot_runner.errors import DataError

NAMES = tiny_names("tieredimagenet", 2)
ORDER = [c for s in ("train", "val", "test") for c in NAMES[s]]


@pytest.fixture
def split_dir(tmp_path):
    return write_split_dir(tmp_path / "split", NAMES)


def _all(split) -> torch.Tensor:
    return split.images[torch.arange(split.images.shape[0])]


def test_npz_layout_sorts_interleaved_images_into_their_classes(tmp_path, split_dir):
    d = TieredImageNet(str(write_tiered(tmp_path / "t", NAMES)), split_dir=split_dir, cache_dir=tmp_path / "c")
    assert d.x_shape == (3, 84, 84)
    for s in ("train", "val", "test"):
        split = d.split(s)
        assert split.class_names == NAMES[s] and split.labels.tolist() == [0, 0, 0, 1, 1, 1]
        got = [tuple(int(v) for v in im[:, 7, 9]) for im in _all(split)]
        assert got == [colour(ORDER.index(w), i) for w in NAMES[s] for i in range(3)]  # each class's items in order


def test_png_pickle_written_by_opencv_gives_the_npz_array(tmp_path, split_dir):
    a = TieredImageNet(str(write_tiered(tmp_path / "n", NAMES)), split_dir=split_dir, cache_dir=tmp_path / "c1")
    b = TieredImageNet(str(write_tiered(tmp_path / "p", NAMES, png=True)), split_dir=split_dir,
                       cache_dir=tmp_path / "c2")
    for s in ("train", "val", "test", "trainval"):
        assert torch.equal(_all(a.split(s)), _all(b.split(s)))  # PNG is lossless; channels reversed back


def test_npz_is_streamed_in_chunks_with_the_same_result(tmp_path, split_dir, monkeypatch):
    root = write_tiered(tmp_path / "n", NAMES, per_class=5)
    whole = TieredImageNet(str(root), split_dir=split_dir, cache_dir=tmp_path / "c1")
    monkeypatch.setattr(tiered, "_ROWS_PER_READ", 3)  # 10 rows per split: chunks of 3, 3, 3, 1
    chunked = TieredImageNet(str(root), split_dir=split_dir, cache_dir=tmp_path / "c2")
    for s in ("train", "val", "test"):
        assert torch.equal(_all(whole.split(s)), _all(chunked.split(s)))


def test_compressed_npz_is_streamed_too(tmp_path, split_dir):
    root = write_tiered(tmp_path / "n", NAMES)
    plain = TieredImageNet(str(root), split_dir=split_dir, cache_dir=tmp_path / "c1")
    for s, (images, _, _) in tiered_arrays(NAMES).items():
        np.savez_compressed(root / f"{s}_images.npz", images=images)
    packed = TieredImageNet(str(root), split_dir=split_dir, cache_dir=tmp_path / "c2")
    assert torch.equal(_all(plain.split("trainval")), _all(packed.split("trainval")))


def test_other_image_size_is_resized(tmp_path, split_dir):
    d = TieredImageNet(str(write_tiered(tmp_path / "n", NAMES)), image_size=16, split_dir=split_dir,
                       cache_dir=tmp_path / "c")
    assert d.x_shape == (3, 16, 16) and tuple(int(v) for v in _all(d.split("test"))[0, :, 3, 3]) == colour(4, 0)


def test_published_totals_are_checked(tmp_path, split_dir):
    root = write_tiered(tmp_path / "n", NAMES)
    with pytest.raises(DataError, match=r"the val split has 6 images where tieredImageNet has 124261"):
        TieredImageNet(str(root), split_dir=split_dir, expect=Expect(totals={"val": 124261}),
                       cache_dir=tmp_path / "c")
    third = tiny_names("tieredimagenet", 3)["train"][2]
    with pytest.raises(DataError, match=rf"has no class {third} of the train split \(602 of 608"):
        TieredImageNet(str(root), cache_dir=tmp_path / "c")  # the shipped split: the tiny copy is refused


def test_missing_files_are_listed_with_where_to_get_them(tmp_path, split_dir):
    root = write_tiered(tmp_path / "n", NAMES)
    os.unlink(root / "test_images.npz")
    os.unlink(root / "val_labels.pkl")
    with pytest.raises(tiered.MissingData) as e:
        TieredImageNet(str(root), split_dir=split_dir)
    assert "lacks" in str(e.value) and "(2 of 6 files missing)" in str(e.value)
    assert "few-shot-ssl-public" in str(e.value)
    assert e.value.missing == [str(root / "val_labels.pkl"), f"{root / 'test_images.npz'} (or test_images_png.pkl)"]


def test_npz_without_an_images_array_or_of_another_length_is_refused(tmp_path, split_dir):
    root = write_tiered(tmp_path / "n", NAMES)
    np.savez(root / "val_images.npz", pictures=np.zeros((6, 84, 84, 3), np.uint8))
    with pytest.raises(DataError, match=r"val_images.npz holds \['pictures.npy'\], no array 'images'"):
        TieredImageNet(str(root), split_dir=split_dir)
    np.savez(root / "val_images.npz", images=np.zeros((5, 84, 84, 3), np.uint8))
    with pytest.raises(DataError, match=r"val_images.npz holds 5 images but .*val_labels.pkl labels 6"):
        TieredImageNet(str(root), split_dir=split_dir)
    np.savez(root / "val_images.npz", images=np.zeros((6, 84, 84), np.uint8))
    with pytest.raises(DataError, match=r"images is uint8 \(6, 84, 84\), not uint8 \(n, H, W, 3\)"):
        TieredImageNet(str(root), split_dir=split_dir)
    (root / "val_images.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"val_images.npz is not a readable npz file"):
        TieredImageNet(str(root), split_dir=split_dir)


def test_labels_pickle_of_another_layout_is_refused(tmp_path, split_dir):
    root = write_tiered(tmp_path / "n", NAMES)
    (root / "train_labels.pkl").write_bytes(pickle.dumps({"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"train_labels.pkl is not a dict with label_specific and label_specific_str"):
        TieredImageNet(str(root), split_dir=split_dir)
    _, labels, strs = tiered_arrays(NAMES)["train"]
    (root / "train_labels.pkl").write_bytes(pickle.dumps({"label_specific": labels + 5, "label_specific_str": strs}))
    with pytest.raises(DataError, match=r"label_specific holds class 6 of 2 names"):
        TieredImageNet(str(root), split_dir=split_dir)


def test_png_pickle_with_a_corrupt_image_names_it(tmp_path, split_dir):
    root = write_tiered(tmp_path / "p", NAMES, png=True)
    items = pickle.loads((root / "val_images_png.pkl").read_bytes())
    items[4] = np.frombuffer(b"garbage", dtype=np.uint8)
    (root / "val_images_png.pkl").write_bytes(pickle.dumps(items))
    with pytest.raises(DataError, match=r"cannot decode image 4 of .*val_images_png.pkl"):
        TieredImageNet(str(root), split_dir=split_dir, cache_dir=tmp_path / "c")
