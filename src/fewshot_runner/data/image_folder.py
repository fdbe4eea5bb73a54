"""The user's own images: ``root/<class>/*.{png,jpg,jpeg,bmp,webp}``, one folder per class.

Class split, from either
  - three text files ``<split_dir>/{train,val,test}.txt``, one class (folder) name a line; folders named
    in none of them are left out; or
  - seeded ratios (``split_ratios``, default 0.64 / 0.16 / 0.20 as miniImageNet's 64 / 16 / 20): the class
    names sorted, shuffled by ``random.Random(split_seed)``, cut into round(r_train * n), round(r_val * n)
    and the rest (each at least one class).
Every image is decoded once (PIL; any mode converted to RGB for ``channels=3`` or luminance for
``channels=1``; resized to ``image_size`` x ``image_size`` with PIL's bilinear filter, no crop, so the
aspect ratio is not kept) into an image store (``data/store.py``) read lazily, so folders larger than
memory work. The store is rebuilt when a file is added, removed or changed (names, sizes and times).

``folder_layout`` is shared with CUB (``data/cub.py``), whose images are laid out the same way.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fewshot_runner.data.archive import Source, tree_files
from fewshot_runner.data.published import (Expect, Inspection, Layout, MissingData, check_image_size,
                                           decode_files_into, fingerprint, load_split)
from fewshot_runner.data.root import resolve_root
from fewshot_runner.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from fewshot_runner.data.base import EpisodicDataset

NAME = "image_folder"
WHAT = "image folder"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_RATIOS = (0.64, 0.16, 0.20)


def class_files(images_dir: Path, what: str) -> dict[str, list[str]]:
    """``<class>`` -> sorted ``<class>/<file>`` paths of the image files (by extension, any case; hidden files
    skipped) two levels under ``images_dir``; classes without such files are left out."""
    out: dict[str, list[str]] = {}
    for rel in tree_files(images_dir, depth=2, what=what):
        cls, name = rel.split("/", 1)
        if name.startswith(".") or cls.startswith(".") or not name.lower().endswith(EXTENSIONS):
            continue
        out.setdefault(cls, []).append(rel)
    return out


def folder_layout(name: str, what: str, root: Path, images_dir: Path, image_size: int, channels: int, get: str,
                  form: str) -> Layout:
    """The Layout of class folders of image files under ``images_dir``; MissingData when there are none."""
    files = class_files(images_dir, what)
    if not files:
        raise MissingData(f"{images_dir} holds no <class>/<image> files ({', '.join(EXTENSIONS)}): {get}",
                          [str(images_dir)], [f"{images_dir}/<class>/<image>"], get)
    src = Source("dir", str(images_dir))

    def fill(out: "np.ndarray", classes: list[str]) -> None:
        decode_files_into(out, [(src, f) for c in classes for f in files[c]], what, image_size, channels)

    paths = [images_dir / f for v in files.values() for f in v]
    key = {"layout": "class folders", "files": fingerprint(paths), "n_files": len(paths), "image_size": image_size,
           "channels": channels}
    found = [f"{images_dir} ({len(files)} class folders, {len(paths)} images)"]
    return Layout(name, what, root, form, found, {c: len(v) for c, v in files.items()},
                  (channels, image_size, image_size), key, fill, get)


def ratio_split(classes: Sequence[str], ratios: Sequence[float], seed: int, where: str) -> dict[str, list[str]]:
    """Class names per split: ``classes`` sorted, shuffled with ``random.Random(seed)``, cut by ``ratios``."""
    try:
        r = [float(x) for x in ratios]
    except (TypeError, ValueError):
        r = []
    if len(r) != 3 or min(r) <= 0:
        raise DataError(f"data.split_ratios must be three positive numbers (train, val, test), got {list(ratios)!r}")
    names = sorted(classes)
    n = len(names)
    n_train, n_val = round(r[0] / sum(r) * n), round(r[1] / sum(r) * n)
    if min(n_train, n_val, n - n_train - n_val) < 1:
        raise DataError(f"{where} has {n} classes, too few for train, val and test classes by data.split_ratios="
                        f"{list(r)}: add class folders (at least 3) or give split files (data.split_dir)")
    random.Random(seed).shuffle(names)
    return {"train": names[:n_train], "val": names[n_train:n_train + n_val], "test": names[n_train + n_val:]}


def inspect(root: str | None = None, image_size: int = 84, channels: int = 3,
            split_dir: str | os.PathLike | None = None, split_ratios: Sequence[float] = DEFAULT_RATIOS,
            split_seed: int = 0, *, cache_dir: str | os.PathLike | None = None) -> Inspection:
    """What ``ImageFolder`` would read, found and listed (nothing decoded)."""
    check_image_size(image_size)
    if channels not in (1, 3):
        raise DataError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    base = resolve_root(NAME, root)
    get = (f"put one folder per class with its images in {base} ({base}/<class>/*.png|jpg|jpeg|bmp|webp), or set "
           f"data.root to such a folder")
    if not base.is_dir():
        what = "a file, not a folder" if base.exists() else "not there"
        raise MissingData(f"image folder {base} is {what}: {get}", [], [f"{base}/<class>/<image>"], get)
    layout = folder_layout(NAME, WHAT, base, base, image_size, channels, get, "class folders")
    if split_dir not in (None, ""):
        names = load_split(NAME, WHAT, split_dir)
    else:
        names = ratio_split(list(layout.counts), split_ratios, split_seed, f"image folder {base}")
    return Inspection(layout, names, Expect() if split_dir else None, cache_dir)


def ImageFolder(root: str | None = None, image_size: int = 84, channels: int = 3,
                split_dir: str | os.PathLike | None = None, split_ratios: Sequence[float] = DEFAULT_RATIOS,
                split_seed: int = 0, *, cache_dir: str | os.PathLike | None = None) -> "EpisodicDataset":
    """The user's class folders as an EpisodicDataset "image_folder": train, val, test, trainval, uint8
    images (n, channels, image_size, image_size) read lazily from the image store.

    root: the folder of class folders; None: ``$FEWSHOT_DATA/image_folder``.
    image_size, channels: every image resized to image_size x image_size and converted to 3 (RGB) or 1 channel.
    split_dir: a folder with train.txt, val.txt, test.txt (class names); null: split by ``split_ratios``
        (train, val, test fractions of the classes), shuffled with ``split_seed``.
    """
    return inspect(root, image_size, channels, split_dir, split_ratios, split_seed, cache_dir=cache_dir).dataset()


ImageFolder.inspect = inspect  # what `fewshot data check` calls (data/check.py)
