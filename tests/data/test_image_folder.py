"""data=image_folder: the user's root/<class>/*.{png,jpg,jpeg,bmp,webp}, split by files or seeded ratios."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_copies import colour, write_class_folders, write_split_dir

from fewshot_runner.data.image_folder import ImageFolder, ratio_split
from fewshot_runner.errors import DataError

CLASSES = [f"class_{k}" for k in range(8)]


def _all(split) -> torch.Tensor:
    return split.images[torch.arange(split.images.shape[0])]


@pytest.fixture
def root(tmp_path):
    """8 classes of 3 images in every accepted format and several modes and sizes."""
    base = tmp_path / "mine"
    formats = [("PNG", ".png", "RGB"), ("JPEG", ".jpg", "RGB"), ("JPEG", ".JPEG", "L"), ("BMP", ".bmp", "RGB"),
               ("WEBP", ".webp", "RGB"), ("PNG", ".png", "RGBA"), ("PNG", ".png", "P"), ("PNG", ".PNG", "L")]
    for k, (fmt, ext, mode) in enumerate(formats):
        write_class_folders(base, [CLASSES[k]], size=(40 + 5 * k, 30), fmt=fmt, ext=ext, mode=mode)
        (base / CLASSES[k] / "notes.txt").write_text("not an image")  # ignored
    return base


def test_every_format_and_mode_becomes_rgb_of_the_configured_size(root, tmp_path):
    d = ImageFolder(str(root), image_size=24, split_dir=write_split_dir(tmp_path / "s", {
        "train": CLASSES[:4], "val": CLASSES[4:6], "test": CLASSES[6:]}), cache_dir=tmp_path / "c")
    assert d.x_shape == (3, 24, 24)
    images = torch.cat([_all(d.split(s)) for s in ("train", "val", "test")])
    assert images.shape == (24, 3, 24, 24)
    lossy = {1, 2, 4, 6}  # JPEG, WebP, and P (a palette near the colour): within a few levels
    for k in range(8):
        for i in range(3):
            got = images[3 * k + i, :, 12, 12].int()
            r, g, b = colour(0, i)  # (each class folder was written on its own: class number 0)
            want = [round((299 * r + 587 * g + 114 * b) / 1000)] * 3 if k in (2, 7) else [r, g, b]  # L: luminance
            tol = 4 if k in lossy else 1
            assert (got - torch.tensor(want)).abs().max() <= tol, (k, i, got.tolist(), want)


def test_grey_channels_take_luminance(root, tmp_path):
    d = ImageFolder(str(root), image_size=8, channels=1, split_ratios=[2, 1, 1], cache_dir=tmp_path / "c")
    assert d.x_shape == (1, 8, 8)
    split = next(d.split(s) for s in ("train", "val", "test") if CLASSES[0] in d.split(s).class_names)
    first = split.index[split.class_names.index(CLASSES[0]), 0]  # class_0 (lossless PNG), item 0
    r, g, b = colour(0, 0)
    assert abs(int(split.images[first.reshape(1)][0, 0, 4, 4]) - round((299 * r + 587 * g + 114 * b) / 1000)) <= 1


def test_ratio_split_is_seeded_disjoint_and_covers_every_class():
    a = ratio_split(CLASSES, [0.5, 0.25, 0.25], seed=3, where="x")
    assert [len(a[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(CLASSES)
    assert a == ratio_split(list(reversed(CLASSES)), [2, 1, 1], seed=3, where="x")  # input order and scale: same
    assert any(ratio_split(CLASSES, [0.5, 0.25, 0.25], seed=s, where="x") != a for s in range(4, 8))
    with pytest.raises(DataError, match=r"x has 2 classes, too few for train, val and test classes"):
        ratio_split(CLASSES[:2], [0.6, 0.2, 0.2], seed=0, where="x")
    with pytest.raises(DataError, match=r"data.split_ratios must be three positive numbers"):
        ratio_split(CLASSES, [0.6, 0.4], seed=0, where="x")


def test_split_files_naming_an_absent_class_are_refused(root, tmp_path):
    split = write_split_dir(tmp_path / "s", {"train": CLASSES[:3] + ["zebra"], "val": CLASSES[3:5],
                                             "test": CLASSES[5:]})
    with pytest.raises(DataError, match=r"image folder under .* has no class zebra of the train split \(1 of 9"):
        ImageFolder(str(root), split_dir=split)


def test_store_is_rebuilt_when_an_image_is_added(root, tmp_path):
    d = ImageFolder(str(root), image_size=8, cache_dir=tmp_path / "c")
    n = sum(int(d.split(s).counts.sum()) for s in ("train", "val", "test"))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(buf, format="PNG")
    (root / CLASSES[0] / "new.png").write_bytes(buf.getvalue())
    d2 = ImageFolder(str(root), image_size=8, cache_dir=tmp_path / "c")
    assert sum(int(d2.split(s).counts.sum()) for s in ("train", "val", "test")) == n + 1


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"image folder .*nowhere is not there: put one folder per class"):
        ImageFolder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty holds no <class>/<image> files"):
        ImageFolder(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"data.channels must be 1 \(grey\) or 3 \(RGB\), got 4"):
        ImageFolder(str(tmp_path / "empty"), channels=4)
    write_class_folders(tmp_path / "bad", ["a", "b", "c"])
    (tmp_path / "bad" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot decode image folder image .*a/broken.png"):
        ImageFolder(str(tmp_path / "bad"), split_ratios=[1, 1, 1], cache_dir=tmp_path / "c")
