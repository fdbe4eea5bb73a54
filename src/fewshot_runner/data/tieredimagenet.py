"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes under 34 high-level categories, split by
category into 351 / 97 / 160 classes (20 / 6 / 8 categories), 779,165 images of 84 x 84 RGB.

The split ships as ``splits/tieredimagenet/{train,val,test}.txt`` (WordNet ids), the first column of
Ren et al.'s ``fewshot/data/tiered_imagenet_split/{train,val,test}.csv`` (renmengye/few-shot-ssl-public).
Its checksum is ``SPLIT_CHECKSUM``; the published sizes checked are the images per split (``EXPECT``).

Layouts read (under ``$FEWSHOT_DATA/tieredimagenet`` by default), per split, as Ren et al.'s code writes them:
  - ``<split>_labels.pkl``: a dict with ``label_specific`` (int array, one class index per image) and
    ``label_specific_str`` (the class wnids), plus ``label_general`` / ``label_general_str`` (unused);
  - and the images, either ``<split>_images.npz`` (the array ``images``, uint8 (n, 84, 84, 3)) or
    ``<split>_images_png.pkl`` (a pickled list of PNG-encoded images, as their ``compress_tiered_imagenet.py``
    writes them with OpenCV: the PNG's channels are the array's reversed, so they are reversed back here
    and both layouts give the same array).
The npz is streamed from its zip member a chunk of rows at a time (never held whole in memory) into the
image store (``data/store.py``), which is read lazily; the PNG pickle is unpickled (restricted: lists,
bytes, numpy arrays) and decoded image by image into it. tieredImageNet at 84 x 84 is about 16.5 GB.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_runner.data.published import (SPLITS, as_str, Expect, fingerprint, get_key, hwc_to_chw,
                                           inspect_published, Inspection, Layout, load_pickle, MissingData)
from fewshot_runner.data.decode import progress
from fewshot_runner.data.root import one_line
from fewshot_runner.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from fewshot_runner.data.base import EpisodicDataset

NAME = "tieredimagenet"
WHAT = "tieredImageNet"
SPLIT_CHECKSUM = "eb2ad17535ac4497"
EXPECT = Expect(totals={"train": 448695, "val": 124261, "test": 206209})
GET = ("get tieredImageNet's {{train,val,test}}_labels.pkl with {{train,val,test}}_images.npz (or *_images_png.pkl), "
       "as Ren et al.'s few-shot-ssl-public README links them, and put them in {root}")
_ROWS_PER_READ = 1024


def _get(root: Path) -> str:
    return GET.format(root=root)


def read_labels(path: Path, root: Path) -> tuple["np.ndarray", list[str]]:
    """(label_specific (n,) int64, label_specific_str wnids) of a ``<split>_labels.pkl``, checked."""
    import numpy as np

    fix = f"replace it with tieredImageNet's {path.name} ({_get(root)})"
    obj = load_pickle(path, "tieredImageNet labels (a dict with label_specific and label_specific_str)", fix)
    try:
        labels, names = get_key(obj, "label_specific"), get_key(obj, "label_specific_str")
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"{path} is not a dict with label_specific and label_specific_str: {fix}") from None
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: label_specific is {labels.dtype} {labels.shape}, not integer (n,): {fix}")
    names = [as_str(n) for n in names]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"{path}: label_specific holds class {int(labels.max())} of {len(names)} names: {fix}")
    return labels.astype(np.int64), names


def _npy_member(path: Path, fix: str) -> tuple[str, int, tuple[int, ...]]:
    """(member name, data offset in its stream, shape) of ``images.npy`` in an npz, checked: uint8 (n, H, W, 3),
    C order."""
    import numpy as np

    try:
        with zipfile.ZipFile(path) as zf:
            if "images.npy" not in zf.namelist():
                raise DataError(f"{path} holds {sorted(zf.namelist())[:5]}, no array 'images': {fix}")
            with zf.open("images.npy") as f:
                version = np.lib.format.read_magic(f)
                header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in header:
                    raise ValueError(f"npy format version {version}")
                shape, fortran, dtype = header[version](f)
                offset = f.tell()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path} is not a readable npz file ({one_line(e)}): {fix}") from None
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
        raise DataError(f"{path}: images is {dtype} {shape}{' (Fortran order)' if fortran else ''}, not uint8 "
                        f"(n, H, W, 3): {fix}")
    return "images.npy", offset, tuple(shape)


def _stream_npz(path: Path, offset: int, shape: tuple[int, ...], rows: "np.ndarray", out: "np.ndarray",
                image_size: int, advance) -> None:
    """Rows of the npz's images, read in order a chunk at a time; row i goes to ``out[rows[i]]`` (skipped if -1)."""
    import numpy as np

    item = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
        f.read(offset)
        for start in range(0, shape[0], _ROWS_PER_READ):
            n = min(_ROWS_PER_READ, shape[0] - start)
            buf = f.read(n * item)
            if len(buf) != n * item:
                raise DataError(f"{path} ends before its {shape[0]} images: delete it and download it again")
            dest = rows[start:start + n]
            keep = dest >= 0
            if keep.any():
                chunk = np.frombuffer(buf, dtype=np.uint8).reshape(n, *shape[1:])[keep]
                out[dest[keep]] = hwc_to_chw(chunk, image_size)
            advance(n)


def decode_png_bgr(data, image_size: int) -> "np.ndarray":
    """One image of a ``*_images_png.pkl`` (PNG bytes written by ``cv2.imencode``) -> uint8 (3, s, s) in the
    npz's channel order (the PNG's channels reversed, as ``cv2.imdecode`` reads them)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(bytes(np.asarray(data, dtype=np.uint8).tobytes()))) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.uint8)[..., ::-1]
    return hwc_to_chw(a[None], image_size)[0]


def find_layout(root: Path, image_size: int = 84) -> Layout:
    """Labels and images of each split under ``root`` (npz preferred over the PNG pickle); MissingData otherwise."""
    import numpy as np

    if root.exists() and not root.is_dir():
        raise MissingData(f"{WHAT} root {root} is a file, not a folder: set data.root to the folder holding the data",
                          [], [str(root)], _get(root))
    found, missing, parts = [], [], {}
    for s in SPLITS:
        labels_path, npz, png = root / f"{s}_labels.pkl", root / f"{s}_images.npz", root / f"{s}_images_png.pkl"
        images = npz if npz.is_file() else png if png.is_file() else None
        found += [str(p) for p in (labels_path, images) if p is not None and p.is_file()]
        if not labels_path.is_file():
            missing.append(str(labels_path))
        if images is None:
            missing.append(f"{npz} (or {png.name})")
        parts[s] = (labels_path, images)
    if missing:
        what = "" if root.is_dir() else " (the folder does not exist)"
        raise MissingData(f"{WHAT} under {root}{what} lacks {missing[0]} ({len(missing)} of 6 files missing): "
                          f"{_get(root)}", found, missing, _get(root))
    counts: dict[str, int] = {}
    plan = []
    for s in SPLITS:
        labels_path, images = parts[s]
        labels, names = read_labels(labels_path, root)
        fix = f"replace it with tieredImageNet's {images.name} ({_get(root)})"
        if images.suffix == ".npz":
            member = _npy_member(images, fix)
            if member[2][0] != len(labels):
                raise DataError(f"{images} holds {member[2][0]} images but {labels_path} labels {len(labels)}: "
                                f"the two are from different copies; {_get(root)}")
        else:
            member = None
        for i, n in enumerate(np.bincount(labels, minlength=len(names)).tolist()):
            if names[i] in counts:
                raise DataError(f"class {names[i]} is in two of the split files under {root}: keep one copy")
            counts[names[i]] = n
        plan.append((images, labels, names, member))

    def fill(out: "np.ndarray", classes: list[str]) -> None:
        start, pos = {}, 0
        for c in classes:
            start[c], pos = pos, pos + counts[c]
        with progress(sum(len(p[1]) for p in plan), f"{WHAT}: writing {len(out)} images") as advance:
            for images, labels, names, member in plan:
                rows = _destinations(labels, names, start)
                if member is not None:
                    _stream_npz(images, member[1], member[2], rows, out, image_size, advance)
                else:
                    _fill_png(images, rows, out, image_size, len(labels), root, advance)

    key = {"layout": "npz/png", "files": fingerprint([p for s in SPLITS for p in parts[s]]), "image_size": image_size}
    form = ", ".join(sorted({"npz" if p[0].suffix == ".npz" else "PNG pickle" for p in plan}))
    return Layout(NAME, WHAT, root, form, found, counts, (3, image_size, image_size), key, fill, _get(root))


def _destinations(labels: "np.ndarray", names: list[str], start: dict[str, int]) -> "np.ndarray":
    """Row of the store each image goes to (its class's start + its rank within the class), -1 if not stored."""
    import numpy as np

    order = np.argsort(labels, kind="stable")
    ranks = np.empty(len(labels), dtype=np.int64)
    counts = np.bincount(labels, minlength=len(names))
    firsts = np.cumsum(counts) - counts
    ranks[order] = np.arange(len(labels)) - firsts[labels[order]]
    base = np.array([start.get(n, -1) for n in names], dtype=np.int64)
    return np.where(base[labels] >= 0, base[labels] + ranks, -1)


def _fill_png(path: Path, rows: "np.ndarray", out: "np.ndarray", image_size: int, n: int, root: Path, advance) -> None:
    fix = f"replace it with tieredImageNet's {path.name} ({_get(root)})"
    items = load_pickle(path, "a tieredImageNet PNG pickle (a list of encoded images)", fix)
    if not isinstance(items, list) or len(items) != n:
        size = len(items) if isinstance(items, list) else type(items).__name__
        raise DataError(f"{path} holds {size} items where the labels have {n} images: {fix}")
    for i, data in enumerate(items):
        if rows[i] >= 0:
            try:
                out[rows[i]] = decode_png_bgr(data, image_size)
            except Exception as e:  # noqa: BLE001 - a corrupt image is named, whatever PIL raised
                raise DataError(f"cannot decode image {i} of {path} ({type(e).__name__}: {one_line(e)}): "
                                f"{fix}") from None
        advance(1)
    items.clear()


def inspect(root: str | None = None, image_size: int = 84, *, split_dir: str | os.PathLike | None = None,
            expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> Inspection:
    """What ``TieredImageNet`` would read, found and listed (labels read, images not)."""
    return inspect_published(NAME, WHAT, find_layout, SPLIT_CHECKSUM, EXPECT, root, image_size, split_dir, expect,
                             cache_dir)


def TieredImageNet(root: str | None = None, image_size: int = 84, *, split_dir: str | os.PathLike | None = None,
                   expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> "EpisodicDataset":
    """tieredImageNet as an EpisodicDataset "tieredimagenet": train (351 classes), val (97), test (160),
    trainval; uint8 images (n, 3, image_size, image_size) read lazily from the image store.

    root: the folder with the files (module docstring); None: ``$FEWSHOT_DATA/tieredimagenet``.
    split_dir, expect, cache_dir: as ``miniimagenet.MiniImageNet``.
    """
    return inspect(root, image_size, split_dir=split_dir, expect=expect, cache_dir=cache_dir).dataset()


TieredImageNet.inspect = inspect  # what `fewshot data check` calls (data/check.py)
