"""The shipped class splits of the published data sets, their checksum, the split check, the restricted
unpickler and the image store they share (data/published.py)."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from fewshot_runner.data import cifar, cub, miniimagenet, tieredimagenet
from fewshot_runner.data.published import (Expect, Layout, MissingData, build_splits, check_split, load_pickle,
                                           load_split, split_checksum)
from fewshot_runner.errors import DataError

SIZES = {"miniimagenet": (64, 16, 20), "tieredimagenet": (351, 97, 160), "cifar_fs": (64, 16, 20),
         "fc100": (12, 4, 4), "cub": (100, 50, 50)}
CHECKSUMS = {"miniimagenet": miniimagenet.SPLIT_CHECKSUM, "tieredimagenet": tieredimagenet.SPLIT_CHECKSUM,
             "cifar_fs": cifar.SCHEMES["cifar_fs"][3], "fc100": cifar.SCHEMES["fc100"][3], "cub": cub.SPLIT_CHECKSUM}


# ----------------------------------------------------------------------------- shipped splits
@pytest.mark.parametrize("name", sorted(SIZES))
def test_shipped_split_has_the_published_sizes_disjoint_classes_and_its_checksum(name):
    names = load_split(name, name)
    assert tuple(len(names[s]) for s in ("train", "val", "test")) == SIZES[name]
    everything = [c for v in names.values() for c in v]
    assert len(set(everything)) == len(everything)
    # the checksum, computed here independently: sha256 of "<split>\t<class>\n" lines, 16 hex digits
    text = "".join(f"{s}\t{c}\n" for s in ("train", "val", "test") for c in names[s])
    assert split_checksum(names) == hashlib.sha256(text.encode()).hexdigest()[:16] == CHECKSUMS[name]


@pytest.mark.parametrize("name", ["miniimagenet", "tieredimagenet"])
def test_imagenet_splits_are_wordnet_ids(name):
    assert all(re.fullmatch(r"n\d{8}", c) for v in load_split(name, name).values() for c in v)


def test_cub_split_is_chen_et_al_index_rule_over_the_sorted_class_folders():
    names = load_split("cub", "cub")
    folders = sorted(c for v in names.values() for c in v)
    assert [int(c[:3]) for c in folders] == list(range(1, 201))  # 001.Black_footed_Albatross ... 200.*
    assert names["train"] == [c for i, c in enumerate(folders) if i % 2 == 0]
    assert names["val"] == [c for i, c in enumerate(folders) if i % 4 == 1]
    assert names["test"] == [c for i, c in enumerate(folders) if i % 4 == 3]


def test_cifar_fs_covers_the_100_classes_and_fc100_the_20_superclasses():
    assert len({c for v in load_split("cifar_fs", "x").values() for c in v}) == 100
    fc = load_split("fc100", "x")
    assert len({c for v in fc.values() for c in v}) == 20
    assert {"aquatic_mammals", "insects", "medium_mammals", "people"} == set(fc["test"])


def test_edited_shipped_split_files_are_refused():
    with pytest.raises(DataError, match=r"shipped miniImageNet split files .* were changed .*reinstall"):
        load_split("miniimagenet", "miniImageNet", None, "0" * 16)


def test_split_files_naming_a_class_twice_or_none_are_refused(tmp_path):
    for s, text in (("train", "a\nb\n"), ("val", "c\n"), ("test", "a\n")):
        (tmp_path / f"{s}.txt").write_text(text)
    with pytest.raises(DataError, match="class a is in both the train and the test split files"):
        load_split("x", "x", tmp_path)
    (tmp_path / "test.txt").write_text("\n")
    with pytest.raises(DataError, match=r"test.txt lists no class"):
        load_split("x", "x", tmp_path)
    (tmp_path / "test.txt").unlink()
    with pytest.raises(DataError, match=r"split file .*test.txt is missing"):
        load_split("x", "x", tmp_path)


# ----------------------------------------------------------------------------- the split check
def _layout(tmp_path, counts, fill=None) -> Layout:
    def default_fill(out, classes):
        pos = 0
        for k, c in enumerate(classes):
            out[pos:pos + counts[c]] = np.arange(counts[c], dtype=np.uint8)[:, None, None, None] + 10 * k
            pos += counts[c]

    return Layout("fake", "Fake", tmp_path, "fake files", ["f"], counts, (1, 2, 2), {"v": 1}, fill or default_fill,
                  "get the fake data")


NAMES = {"train": ["a", "b"], "val": ["c"], "test": ["d"]}


def test_split_check_refuses_a_missing_class_an_empty_one_and_other_sizes_in_one_line(tmp_path):
    counts = {"a": 3, "b": 3, "c": 3, "d": 3, "e": 3}
    check_split(_layout(tmp_path, counts), NAMES, Expect(per_class=3, totals={"train": 6, "all": 12}))
    cases = [({**counts, "d": 0}, None, r"no image of class d \(test split\)"),
             ({k: v for k, v in counts.items() if k != "c"}, None, r"no class c of the val split \(1 of 4"),
             ({**counts, "b": 2}, Expect(per_class=3), r"class b has 2 images where Fake has 3 per class \(1 classes"),
             (counts, Expect(totals={"train": 7}), r"the train split has 6 images where Fake has 7"),
             (counts, Expect(totals={"all": 11}), r"the data set has 12 images where Fake has 11")]
    for c, expect, message in cases:
        with pytest.raises(MissingData, match=message) as e:
            check_split(_layout(tmp_path, c), NAMES, expect)
        assert "\n" not in str(e.value) and str(e.value).endswith("get the fake data")


def test_store_holds_the_split_classes_in_order_and_is_built_once(tmp_path):
    counts = {"a": 2, "b": 3, "c": 1, "d": 2, "e": 4}
    splits = build_splits(_layout(tmp_path, counts), NAMES, cache_dir=tmp_path / "c")
    assert [splits[s].class_names for s in ("train", "val", "test", "trainval")] == [["a", "b"], ["c"], ["d"],
                                                                                    ["a", "b", "c"]]
    tv = splits["trainval"]
    assert tv.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert tv.images[np.arange(6)][:, 0, 0, 0].tolist() == [0, 1, 10, 11, 12, 20]  # class k's item i: 10 k + i
    assert splits["test"].images[np.arange(2)][:, 0, 0, 0].tolist() == [30, 31]

    def must_not_decode(out, classes):
        raise AssertionError("the store was rebuilt")

    again = build_splits(_layout(tmp_path, counts, must_not_decode), NAMES, cache_dir=tmp_path / "c")
    assert again["train"].images[np.arange(5)].tolist() == splits["train"].images[np.arange(5)].tolist()


# ----------------------------------------------------------------------------- the restricted unpickler
class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_naming_any_other_class_is_refused_without_running_it(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"image_data": _RunsCode(tmp_path / "ran")}))
    with pytest.raises(DataError, match=r"evil.pkl is not a thing \(UnpicklingError: it holds a posix.system object"):
        load_pickle(evil, "a thing", "fix it")
    assert not (tmp_path / "ran").exists()


def test_pickle_of_containers_strings_and_numpy_arrays_loads_python2_style_too(tmp_path):
    obj = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "names": [b"x", "y"], "n": (1, 2.5, {3})}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        back = load_pickle(path, "a thing", "fix it")
        assert np.array_equal(back[b"data"], obj[b"data"]) and back["names"] == obj["names"] and back["n"] == obj["n"]


def test_numpy_1_pickles_naming_numpy_core_load(tmp_path):
    """Pickles written under numpy 1.x (CIFAR-100's, the miniImageNet caches) name numpy.core.multiarray."""
    data = pickle.dumps({"a": np.arange(6, dtype=np.uint8)}, protocol=2)
    assert b"cnumpy._core.multiarray\n_reconstruct" in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    assert load_pickle(path, "a thing", "fix it")["a"].tolist() == [0, 1, 2, 3, 4, 5]


def test_torn_pickle_is_one_line(tmp_path):
    path = tmp_path / "torn.pkl"
    path.write_bytes(pickle.dumps({"a": np.zeros(100)})[:50])
    with pytest.raises(DataError, match=r"torn.pkl is not a thing \(.*\): fix it$"):
        load_pickle(path, "a thing", "fix it")


def test_module_import_does_not_import_torch():
    code = ("import sys; import fewshot_runner.data.miniimagenet, fewshot_runner.data.tieredimagenet, "
            "fewshot_runner.data.cifar, fewshot_runner.data.cub, fewshot_runner.data.image_folder; "
            "print('torch' in sys.modules, 'PIL' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
