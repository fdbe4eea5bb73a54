"""CIFAR-FS and FC100 on a tiny copy of torchvision's CIFAR-100 python files (real pickles), written here."""

from __future__ import annotations

import pickle

import pytest
import torch
from tiny_copies import colour, tiny_names, write_cifar, write_split_dir

from fewshot_runner.data.cifar import CIFAR_FS, FC100
from fewshot_runner.data.published import Expect
from fewshot_runner.errors import DataError

FS = tiny_names("cifar_fs", 2)  # 2 fine classes per split, from the shipped CIFAR-FS lists
FINE = [c for s in ("train", "val", "test") for c in FS[s]]
FC = tiny_names("fc100", 1)  # 1 superclass per split, from the shipped FC100 lists
SUPER = [FC["train"][0], FC["val"][0], FC["test"][0]]
COARSE_OF = {c: SUPER[i % 3] for i, c in enumerate(FINE)}  # two fine classes under each superclass


@pytest.fixture(params=[True, False], ids=["bytes-keys", "str-keys"])
def root(request, tmp_path):
    return write_cifar(tmp_path / "cifar", FINE, COARSE_OF, train_per=3, test_per=1, bytes_keys=request.param)


def _all(split) -> torch.Tensor:
    return split.images[torch.arange(split.images.shape[0])]


def test_cifar_fs_classes_hold_train_then_test_images_in_rgb_planes(root, tmp_path):
    d = CIFAR_FS(str(root), split_dir=write_split_dir(tmp_path / "s", FS), cache_dir=tmp_path / "c")
    assert d.x_shape == (3, 32, 32)
    for s in ("train", "val", "test"):
        split = d.split(s)
        assert split.class_names == FS[s] and split.counts.tolist() == [4, 4]
        images = _all(split)
        assert images[:, :, 1, 2].tolist() == [[255, 0, 1]] * 8  # the marked pixel: row 1, column 2, R G B
        got = [tuple(int(v) for v in im[:, 0, 0]) for im in images]
        # items 0-2 come from the train file, item 3 from the test file
        assert got == [colour(FINE.index(c), i) for c in FS[s] for i in range(4)]


def test_fc100_classes_are_the_fine_classes_of_each_splits_superclasses(root, tmp_path):
    d = FC100(str(root), split_dir=write_split_dir(tmp_path / "s", FC), cache_dir=tmp_path / "c")
    for s, sup in zip(("train", "val", "test"), SUPER):
        split = d.split(s)
        fine_here = [c for c in FINE if COARSE_OF[c] == sup]  # (in label order: FINE is the meta order)
        assert split.class_names == fine_here and split.counts.tolist() == [4, 4]
        got = [tuple(int(v) for v in im[:, 0, 0]) for im in _all(split)]
        assert got == [colour(FINE.index(c), i) for c in fine_here for i in range(4)]


def test_published_sizes_refuse_the_tiny_copy(root, tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-FS under .* has no class .* of the train split \(94 of 100"):
        CIFAR_FS(str(root), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=rf"FC100 under .* has 2 classes of superclass {SUPER[0]} \(train split\) "
                                        rf"where CIFAR-100 has 5"):
        FC100(str(root), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"class .* has 4 images where FC100 has 600 per class"):
        FC100(str(root), split_dir=write_split_dir(tmp_path / "s", FC), expect=Expect(per_class=600))


def test_files_in_the_root_itself_are_read_too(tmp_path):
    root = write_cifar(tmp_path / "c", FINE, COARSE_OF)
    flat = tmp_path / "flat"
    (root / "cifar-100-python").rename(flat)
    d = CIFAR_FS(str(flat), split_dir=write_split_dir(tmp_path / "s", FS), cache_dir=tmp_path / "cache")
    assert d.split("test").class_names == FS["test"]


def test_missing_meta_or_only_the_archive_says_what_to_do(tmp_path):
    root = write_cifar(tmp_path / "c", FINE, COARSE_OF)
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match=r"no CIFAR-100 python files under .* \(missing .*cifar-100-python/meta\): get "
                                        r"CIFAR-100's python version"):
        CIFAR_FS(str(root))
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "cifar-100-python.tar.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"cifar-100-python.tar.gz is not a readable tar archive"):  # read in place
        FC100(str(empty))


def test_root_defaults_to_the_shared_cifar100_folder(tmp_path, monkeypatch):
    write_cifar(tmp_path / "data" / "cifar100", FINE, COARSE_OF)
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "data"))
    d = FC100(split_dir=write_split_dir(tmp_path / "s", FC), cache_dir=tmp_path / "c")
    assert d.split("val").class_names == [c for c in FINE if COARSE_OF[c] == SUPER[1]]


@pytest.mark.parametrize("obj, message", [
    ({"data": [1, 2]}, r"is not a dict with data, fine_labels and coarse_labels"),
    ({"data": [[1, 2]], "fine_labels": [0], "coarse_labels": [0]}, r"data is int64 \(1, 2\) with 1 labels, not uint8"),
])
def test_train_file_of_another_layout_is_refused(tmp_path, obj, message):
    root = write_cifar(tmp_path / "c", FINE, COARSE_OF)
    (root / "cifar-100-python" / "train").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match=message):
        CIFAR_FS(str(root), split_dir=write_split_dir(tmp_path / "s", FS))
