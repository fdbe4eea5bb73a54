"""The lazy class store: a ClassSplit whose images stay on disk (numpy.memmap) gives the same
images and, under the same sampler, bitwise the same episodes as the split in memory."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from fewshot_runner.data.base import ClassSplit
from fewshot_runner.data.sampler import EpisodeSampler
from fewshot_runner.data.store import DiskImages, open_class_store, store_split, write_class_store
from fewshot_runner.data.synthetic import Synthetic
from fewshot_runner.errors import DataError


@pytest.fixture
def split() -> ClassSplit:
    return Synthetic(n_classes_train=9, per_class=6, image_size=12, channels=3, seed=1).split("train")


def _uneven() -> ClassSplit:
    """Items of classes interleaved and of uneven counts: the store reorders them class-major."""
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 2, 1, 2])
    images = (torch.arange(12, dtype=torch.uint8) * 20).view(-1, 1, 1, 1).expand(-1, 1, 3, 2).contiguous()
    return ClassSplit("val", images, labels, ["a", "b", "c"])


def test_lazy_store_returns_the_images_of_the_in_memory_split(split, tmp_path):
    lazy = store_split(split, tmp_path / "train.store")
    assert isinstance(lazy.images, DiskImages)
    assert lazy.class_names == split.class_names and lazy.x_shape == split.x_shape
    assert torch.equal(lazy.counts, split.counts) and lazy.images.shape == split.images.shape
    assert torch.equal(lazy.images.tensor(), split.images)
    idx = torch.tensor([[5, 0, 53], [7, 7, 1]])
    got = lazy.images[idx]
    assert got.dtype == torch.uint8 and got.shape == (2, 3, 3, 12, 12) and torch.equal(got, split.images[idx])
    assert torch.equal(lazy.images[3], split.images[3]) and torch.equal(lazy.images[-1], split.images[-1])
    assert torch.equal(lazy.images[2:9:3], split.images[2:9:3])
    with pytest.raises(IndexError):
        lazy.images[torch.tensor([54])]


@pytest.mark.parametrize("make", ["synthetic", "uneven"])
def test_sampler_over_the_lazy_store_gives_bitwise_the_same_episodes(split, tmp_path, make):
    mem = split if make == "synthetic" else _uneven()
    lazy = store_split(mem, tmp_path / "s.store")
    shape = (5, 2, 3) if make == "synthetic" else (3, 1, 2)
    a, b = EpisodeSampler(mem, *shape, seed=4), EpisodeSampler(lazy, *shape, seed=4)
    for n in (1, 7, 3):
        ea, eb = a.sample(n), b.sample(n)
        for f in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(ea, f), getattr(eb, f)), f
        assert eb.support_x.dtype == torch.uint8


def test_store_serves_any_subset_of_its_classes(split, tmp_path):
    store = write_class_store(tmp_path / "all.store", {"v": 1}, split.class_names, split.counts.tolist(), split.x_shape,
                              lambda out: out.__setitem__(slice(None), split.images.numpy()))
    names = [split.class_names[i] for i in (7, 2, 4)]
    sub = store.split("test", names)
    assert sub.class_names == names and sub.images.shape[0] == 18
    want = split.images.view(9, 6, 3, 12, 12)[[7, 2, 4]].reshape(18, 3, 12, 12)
    assert torch.equal(sub.images.tensor(), want) and torch.equal(sub.labels, torch.arange(3).repeat_interleave(6))
    with pytest.raises(DataError, match="names class nope"):
        store.split("test", ["nope"])


def test_reopened_store_is_current_stale_or_corrupt(split, tmp_path):
    path = tmp_path / "s.store"
    assert open_class_store(path, {"v": 1}) is None  # absent
    store_split(split, path, key={"v": 1, "size": [12, 12]})
    again = open_class_store(path, {"v": 1, "size": (12, 12)})  # JSON-equal key: a tuple is a list
    assert again is not None and torch.equal(again.split("train").images.tensor(), split.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_class_store(path, {"v": 2, "size": [12, 12]}) is None  # stale: silent
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.warns(UserWarning, match="store .* is corrupt"):
        assert open_class_store(path, {"v": 1, "size": [12, 12]}) is None
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="store .* is corrupt"):
        assert open_class_store(path, {"v": 1, "size": [12, 12]}) is None


def test_a_failed_write_leaves_no_file_and_the_old_store_intact(split, tmp_path):
    path = tmp_path / "s.store"
    store_split(split, path, key={"v": 1})
    before = path.read_bytes()

    def boom(out):
        out[:3] = 0
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed"):
        write_class_store(path, {"v": 2}, split.class_names, split.counts.tolist(), split.x_shape, boom)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.store"]


def test_disk_images_pickle_as_their_path_not_their_pages(split, tmp_path):
    lazy = store_split(split, tmp_path / "s.store")
    lazy.images[torch.tensor([0])]  # opens the map
    blob = pickle.dumps(lazy.images)
    assert len(blob) < 1000
    assert torch.equal(pickle.loads(blob)[torch.tensor([4, 2])], split.images[[4, 2]])


def test_store_is_filled_by_decoding_straight_into_the_memmap(tmp_path):
    """The path for data that does not fit in memory: decode_files writes into the store's memmap."""
    import functools

    from test_omniglot import write_zips  # the tiny fake Omniglot in the real on-disk format

    from fewshot_runner.data import omniglot as om
    from fewshot_runner.data.decode import decode_files

    root = tmp_path / "o"
    write_zips(root)
    listing = om.list_characters(root, om.find_sources(root))
    ref = om.decode_all(listing, 20, workers=1)
    decode = functools.partial(om.decode_image, image_size=20)
    store = write_class_store(tmp_path / "o.store", {"image_size": 20}, listing.names, [listing.per_class] * len(listing.names),
                              (1, 20, 20), lambda out: decode_files(listing.files(), decode, (20, 20), what="Omniglot",
                                                                     out=out.reshape(-1, 20, 20), workers=1))
    assert np.array_equal(store.images.tensor().numpy().reshape(ref.shape), ref.numpy())
