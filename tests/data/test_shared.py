"""The machinery every data set shares (root, archive, decode, cache, class_splits), tested on a
data set that is not Omniglot: a tiny RGB "image folder" in zips and trees, generated here."""

from __future__ import annotations

import functools
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_runner.data.archive import Source, read_member, tree_files, unsafe_member, zip_file_members
from fewshot_runner.data.cache import cache_path, load_cache, save_cache
from fewshot_runner.data.class_splits import (load_split_files, packaged_split_dir, parse_rotation, rotate_classes,
                                              with_rotations)
from fewshot_runner.data.decode import decode_files
from fewshot_runner.data.root import resolve_root
from fewshot_runner.errors import DataError


def _jpeg_like_png(seed: int, size=(9, 7)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_rgb(data: bytes, size: int) -> np.ndarray:
    """A user's RGB decode: -> (3, size, size) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)


def _folder_zip(path: Path, classes=("cat", "dog"), per=3, extra=None) -> list[str]:
    names = []
    with zipfile.ZipFile(path, "w") as zf:
        for c, cls in enumerate(classes):
            zf.writestr(f"train/{cls}/", b"")
            for i in range(per):
                names.append(f"train/{cls}/{i:03d}.png")
                zf.writestr(names[-1], _jpeg_like_png(10 * c + i))
        for name in extra or ():
            zf.writestr(zipfile.ZipInfo(name), b"x")
    return names


# ----------------------------------------------------------------------------- root
def test_root_is_the_argument_else_fewshot_data_per_name_else_the_user_cache(tmp_path, monkeypatch):
    assert resolve_root("mini", tmp_path / "x") == (tmp_path / "x").absolute()
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "d"))
    assert resolve_root("mini", None) == tmp_path / "d" / "mini"
    assert resolve_root("cub", "") == tmp_path / "d" / "cub"
    monkeypatch.delenv("FEWSHOT_DATA")
    assert resolve_root("mini") == Path.home() / ".cache" / "fewshot" / "mini"


# ----------------------------------------------------------------------------- archive
def test_zip_members_are_listed_and_read_in_place(tmp_path):
    z = tmp_path / "mini.zip"
    names = _folder_zip(z)
    assert zip_file_members(z) == names  # folders left out, archive order
    assert read_member(Source("zip", str(z)), names[1]) == _jpeg_like_png(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini.zip"]  # nothing extracted


@pytest.mark.parametrize("name", ["../x.png", "/abs.png", "C:evil.png", "a/../../b.png", "a\\..\\..\\b.png"])
def test_unsafe_member_names_refuse_the_whole_archive(tmp_path, name):
    assert unsafe_member(name)
    z = tmp_path / "bad.zip"
    _folder_zip(z, extra=[name])
    with pytest.raises(DataError, match="unsafe member name") as err:
        zip_file_members(z)
    assert str(z) in str(err.value) and "\n" not in str(err.value)
    assert not unsafe_member("train/cat/..png") and not unsafe_member("a/b..c/d.png")


def test_tree_files_lists_files_at_one_depth_sorted(tmp_path):
    for rel in ("b/2.png", "a/1.png", "a/0.png", "a/deeper/x.png", "top.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert tree_files(tmp_path, depth=2) == ["a/0.png", "a/1.png", "b/2.png"]
    with pytest.raises(DataError, match="cannot read the mini folder"):
        tree_files(tmp_path / "absent", depth=2, what="mini")


# ----------------------------------------------------------------------------- decode
@pytest.mark.parametrize("workers, chunk", [(1, 400), (2, 2)])
def test_decode_files_is_generic_over_the_decode_function(tmp_path, workers, chunk):
    z = tmp_path / "mini.zip"
    names = _folder_zip(z, per=4)
    tree = tmp_path / "tree"
    files = [(Source("zip", str(z)), n) for n in names[:5]]
    for n in names[5:]:  # the rest from a folder: jobs never mix sources
        (tree / n).parent.mkdir(parents=True, exist_ok=True)
        (tree / n).write_bytes(read_member(Source("zip", str(z)), n))
        files.append((Source("dir", str(tree)), n))
    out = decode_files(files, functools.partial(decode_rgb, size=5), (3, 5, 5), what="Mini", workers=workers,
                       chunk=chunk, pool_min=1)
    want = np.stack([decode_rgb(_jpeg_like_png(10 * (i // 4) + i % 4), 5) for i in range(8)])
    assert out.dtype == np.uint8 and out.shape == (8, 3, 5, 5) and np.array_equal(out, want)


def test_a_file_that_does_not_decode_is_named(tmp_path):
    tree = tmp_path / "t"
    (tree / "c").mkdir(parents=True)
    (tree / "c" / "ok.png").write_bytes(_jpeg_like_png(0))
    (tree / "c" / "bad.png").write_bytes(b"\x89PNG nope")
    files = [(Source("dir", str(tree)), "c/ok.png"), (Source("dir", str(tree)), "c/bad.png")]
    with pytest.raises(DataError, match=r"cannot decode Mini image .*c/bad\.png .*download it again") as err:
        decode_files(files, functools.partial(decode_rgb, size=4), (3, 4, 4), what="Mini", workers=1)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- cache
def test_cache_is_keyed_stale_is_silent_corrupt_warns(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    path = cache_path(root, "mini_84", tmp_path / "c")
    assert path.parent == tmp_path / "c" and path.name.startswith("mini_84_") and path.suffix == ".pt"
    key = {"format": "test.mini", "version": 1, "names": ["a", "b"]}
    images = torch.arange(24, dtype=torch.uint8).view(2, 3, 4)
    spec = {"images": (torch.uint8, (2, 3, 4))}
    assert load_cache(path, key, "Mini", spec) is None  # absent
    assert save_cache(path, {**key, "images": images}, "Mini")
    assert torch.equal(load_cache(path, key, "Mini", spec)["images"], images)
    assert load_cache(path, {**key, "names": ["a", "c"]}, "Mini", spec) is None  # stale
    with pytest.warns(UserWarning, match="Mini cache .* is corrupt .*bad images tensor"):
        assert load_cache(path, key, "Mini", {"images": (torch.uint8, (2, 3, 5))}) is None
    path.write_bytes(b"junk")
    with pytest.warns(UserWarning, match="Mini cache .* is corrupt"):
        assert load_cache(path, key, "Mini", spec) is None


# ----------------------------------------------------------------------------- class splits
def test_split_files_are_read_and_checked_for_any_data_set(tmp_path):
    for split, lines in {"train": ["n01", "n02", ""], "val": ["n03"], "test": ["n04 "]}.items():
        (tmp_path / f"{split}.txt").write_text("\n".join(lines))
    names = load_split_files(tmp_path, re.compile(r"^n\d+$"), "a WordNet id")
    assert names == {"train": ["n01", "n02"], "val": ["n03"], "test": ["n04"]}  # trainval optional
    (tmp_path / "val.txt").write_text("cat\n")
    with pytest.raises(DataError, match="line 1 of split file .*val.txt is 'cat', not a WordNet id"):
        load_split_files(tmp_path, re.compile(r"^n\d+$"), "a WordNet id")
    (tmp_path / "val.txt").write_text("n03\nn03\n")
    with pytest.raises(DataError, match="lists a class twice"):
        load_split_files(tmp_path)
    (tmp_path / "val.txt").write_text("n03\n")
    (tmp_path / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt is missing"):
        load_split_files(tmp_path)


def test_packaged_split_scheme_and_unknown_scheme():
    assert packaged_split_dir("vinyals", "Omniglot").joinpath("train.txt").is_file()
    with pytest.raises(DataError, match="unknown Mini split scheme 'ravi': use data.split_scheme=.*vinyals"):
        packaged_split_dir("ravi", "Mini")


def test_rotations_as_new_classes_turn_counterclockwise():
    base = torch.arange(2 * 3 * 1 * 2 * 2, dtype=torch.uint8).view(2, 3, 1, 2, 2)  # (classes, per, C, H, W)
    names = with_rotations(["a/x", "b/y"])
    assert names[:4] == ["a/x/rot000", "a/x/rot090", "a/x/rot180", "a/x/rot270"]
    parsed = [parse_rotation(n) for n in names]
    out = rotate_classes(base, torch.tensor([0 if b == "a/x" else 1 for b, _ in parsed]), torch.tensor([k for _, k in parsed]))
    assert out.shape == (8, 3, 1, 2, 2)
    for i, (b, k) in enumerate(parsed):
        assert torch.equal(out[i], torch.rot90(base[0 if b == "a/x" else 1], k, dims=(-2, -1)))
    # counterclockwise: the top-right pixel goes to the top-left
    assert out[1, 0, 0, 0, 0] == base[0, 0, 0, 0, 1]
