"""CUB-200-2011 on a tiny copy of its CUB_200_2011/images/<class>/*.jpg layout (real JPEGs), written here."""

from __future__ import annotations

import pytest
import torch
from tiny_copies import colour, tiny_names, write_class_folders, write_split_dir

from fewshot_runner.data.cub import CUB
from fewshot_runner.data.published import Expect
from fewshot_runner.errors import DataError

NAMES = tiny_names("cub", 2)
ORDER = [c for s in ("train", "val", "test") for c in NAMES[s]]


def _all(split) -> torch.Tensor:
    return split.images[torch.arange(split.images.shape[0])]


@pytest.mark.parametrize("sub", ["CUB_200_2011/images", "images"])
def test_class_folders_of_jpegs_become_rgb_84_by_84_classes(tmp_path, sub):
    base = tmp_path / "cub" / sub
    write_class_folders(base, ORDER[:4], size=(50, 40))
    write_class_folders(base, ORDER[4:], size=(30, 60), mode="L")  # some CUB photographs are grey
    d = CUB(str(tmp_path / "cub"), split_dir=write_split_dir(tmp_path / "s", NAMES), cache_dir=tmp_path / "c")
    assert d.x_shape == (3, 84, 84)
    for s in ("train", "val"):
        got = [tuple(int(v) for v in im[:, 42, 42]) for im in _all(d.split(s))]
        want = [colour(ORDER.index(c), i) for c in NAMES[s] for i in range(3)]
        assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) <= 3
    grey = _all(d.split("test"))
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])  # L -> RGB: equal channels


def test_shipped_split_and_published_total_refuse_a_partial_copy(tmp_path):
    write_class_folders(tmp_path / "cub" / "CUB_200_2011" / "images", ORDER)
    with pytest.raises(DataError, match=r"has no class 005.Crested_Auklet of the train split \(194 of 200"):
        CUB(str(tmp_path / "cub"), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"the data set has 18 images where CUB-200-2011 has 11788"):
        CUB(str(tmp_path / "cub"), split_dir=write_split_dir(tmp_path / "s", NAMES),
            expect=Expect(totals={"all": 11788}))


def test_missing_images_say_where_to_get_them(tmp_path):
    with pytest.raises(DataError, match=r"no CUB-200-2011 images under .*: get CUB_200_2011.tgz .* extract it"):
        CUB(str(tmp_path))
    (tmp_path / "CUB_200_2011.tgz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"CUB_200_2011.tgz is not a readable tar archive"):  # read in place
        CUB(str(tmp_path))
