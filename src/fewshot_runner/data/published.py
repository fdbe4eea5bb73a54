"""What the published image data sets share (miniImageNet, tieredImageNet, CIFAR-FS, FC100, CUB and the
user's image folders): their shipped class splits and the check of a copy against them, safe unpickling,
image decoding, and one store-backed way from "the files found under the root" to ClassSplits.

A data set module finds its files and returns a :class:`Layout` (what it found, how many images each
class has, how to write them); :func:`build_splits` checks the layout against the split, builds the
image store once (``data/store.py``: one file, read lazily through ``numpy.memmap``, so no data set
needs to fit in memory) and cuts the splits from it. A layout that cannot be used is a
:class:`MissingData` error: one line for the user, plus the lists ``fewshot data check`` prints.

Split check (``check_split``): every class of the split files is in the data, no class is in two
splits, and, for a shipped split, the images per class (or per split) are the published numbers and
the split files are the shipped ones (their checksum). A partial or foreign copy is refused before
training in one line that names the first missing class and what to get.

Unpickling (``load_pickle``): a restricted ``pickle.Unpickler`` that rebuilds builtin containers,
strings, numbers and numpy arrays only; a pickle that names any other class is refused, never run.

No torch at import time.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from fewshot_runner.data import cache as _cache
from fewshot_runner.data.archive import RestrictedUnpickler, Source
from fewshot_runner.data.class_splits import load_split_files, packaged_split_dir
from fewshot_runner.data.checksum import split_checksum
from fewshot_runner.data.root import one_line, resolve_root
from fewshot_runner.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from fewshot_runner.data.base import ClassSplit, EpisodicDataset

SPLITS = ("train", "val", "test")
STORE_VERSION = 1


# ----------------------------------------------------------------------------- what was found
class MissingData(DataError):
    """The data under the root is missing or unusable: ``str(e)`` is the one line; ``found`` and
    ``missing`` (lists of paths or descriptions) and ``get`` (where to get the files) are what
    ``fewshot data check`` prints."""

    def __init__(self, message: str, found: Sequence[str] = (), missing: Sequence[str] = (), get: str = "") -> None:
        super().__init__(message)
        self.found, self.missing, self.get = list(found), list(missing), get


@dataclass
class Layout:
    """The files of one data set found under its root.

    name: the store's file name base ("miniimagenet"); what: the data set's name in messages.
    form: which of its layouts this is, in words; found: the files or folders read.
    counts: class name -> images of that class found.
    item_shape: (C, H, W) of every image after decoding.
    key: what the images depend on (file sizes and times, image size, ...): a store with another key is rebuilt.
    fill(out, classes): writes the images of ``classes``, class after class, into ``out``, a uint8
        (sum of their counts, C, H, W) array (a store's memmap).
    get: where to get the data (ends every "partial copy" message).
    groups: group name -> its classes, where the data set groups them (CIFAR-100: superclass -> classes).
    """

    name: str
    what: str
    root: Path
    form: str
    found: list[str]
    counts: dict[str, int]
    item_shape: tuple[int, int, int]
    key: dict
    fill: Callable[["np.ndarray", list[str]], None]
    get: str = ""
    groups: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Expect:
    """Published sizes a shipped split's copy must have: images per class, and/or images per split."""

    per_class: int | None = None
    totals: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- split files
def load_split(dataset: str, what: str, split_dir: str | os.PathLike | None = None,
               shipped_checksum: str | None = None) -> dict[str, list[str]]:
    """Class names per split from ``<split_dir or the shipped splits/<dataset>>/{train,val,test}.txt``.

    A class in two splits is refused; shipped files that were edited (another checksum) too.
    """
    base = packaged_split_dir(dataset, what) if split_dir is None else Path(split_dir)
    names = load_split_files(base, None, "a class name", splits=SPLITS, optional=())
    seen: dict[str, str] = {}
    for s in SPLITS:
        if not names[s]:
            raise DataError(f"split file {base.joinpath(f'{s}.txt')} lists no class: give it one class name a line")
        for c in names[s]:
            if c in seen:
                raise DataError(f"class {c} is in both the {seen[c]} and the {s} split files under {base}: "
                                f"keep it in one")
            seen[c] = s
    if split_dir is None and shipped_checksum is not None and split_checksum(names) != shipped_checksum:
        raise DataError(f"the shipped {what} split files under {base} were changed (checksum {split_checksum(names)}, "
                        f"shipped {shipped_checksum}): reinstall fewshot_runner")
    return names


def check_split(layout: Layout, names: dict[str, list[str]], expect: Expect | None) -> None:
    """Refuse, in one line, a copy that does not hold the split: a class missing, an empty class, or
    (``expect``) other numbers of images per class or per split than the published ones."""
    where = f"{layout.what} under {layout.root} ({layout.form})"
    for s in SPLITS:
        missing = [c for c in names[s] if c not in layout.counts]
        if missing:
            total = sum(c not in layout.counts for v in names.values() for c in v)
            raise MissingData(f"{where} has no class {missing[0]} of the {s} split ({total} of "
                              f"{sum(map(len, names.values()))} split classes missing): the copy is partial or "
                              f"has other classes; {layout.get}", layout.found, [f"class {c}" for c in missing],
                              layout.get)
        empty = [c for c in names[s] if layout.counts[c] == 0]
        if empty:
            raise MissingData(f"{where} has no image of class {empty[0]} ({s} split): the copy is partial; "
                              f"{layout.get}",
                              layout.found, [f"images of class {c}" for c in empty], layout.get)
    if expect is None:
        return
    if expect.per_class is not None:
        odd = [c for v in names.values() for c in v if layout.counts[c] != expect.per_class]
        if odd:
            raise MissingData(f"{where}: class {odd[0]} has {layout.counts[odd[0]]} images where {layout.what} has "
                              f"{expect.per_class} per class ({len(odd)} classes differ): the copy is partial or "
                              f"another version; {layout.get}", layout.found, [f"images of class {c}" for c in odd],
                              layout.get)
    for s, want in expect.totals.items():
        classes = names[s] if s in names else [c for v in names.values() for c in v]
        n = sum(layout.counts[c] for c in classes)
        if n != want:
            which = f"the {s} split" if s in names else "the data set"
            raise MissingData(f"{where}: {which} has {n} images where {layout.what} has {want}: the copy is partial "
                              f"or another version; {layout.get}", layout.found, [f"{want - n} images of {which}"],
                              layout.get)


# ----------------------------------------------------------------------------- the store
def store_path(layout: Layout, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the image store of ``layout`` goes (``data.cache.cache_path`` rules, suffix ``.store``)."""
    c, h, w = layout.item_shape
    return _cache.cache_path(layout.root, f"{layout.name}_{c}x{h}x{w}", cache_dir, suffix=".store")


def build_splits(layout: Layout, names: dict[str, list[str]], expect: Expect | None = None,
                 cache_dir: str | os.PathLike | None = None) -> dict[str, "ClassSplit"]:
    """Check ``layout`` against ``names``, open (or build once) its store, and cut train, val, test and
    trainval ClassSplits from it; their images are ``DiskImages`` (uint8 (n, C, H, W), read lazily)."""
    from fewshot_runner.data.store import open_class_store, write_class_store

    check_split(layout, names, expect)
    order = [c for s in SPLITS for c in names[s]]
    counts = [layout.counts[c] for c in order]
    key = {"format": f"fewshot_runner.{layout.name}", "version": STORE_VERSION, **layout.key,
           "item_shape": list(layout.item_shape), "classes": order, "counts": counts}
    path = store_path(layout, cache_dir)
    store = open_class_store(path, key, what=layout.what)
    if store is None:
        store = write_class_store(path, key, order, counts, layout.item_shape, fill=lambda out: layout.fill(out, order))
    splits = {s: store.split(s, names[s]) for s in SPLITS}
    splits["trainval"] = store.split("trainval", names["train"] + names["val"])
    return splits


@dataclass
class Inspection:
    """A data set's layout found under its root, with the split it must hold: what ``fewshot data check``
    reports, and (``dataset()``) the EpisodicDataset built from it."""

    layout: Layout
    names: dict[str, list[str]]
    expect: Expect | None = None
    cache_dir: str | os.PathLike | None = None

    @property
    def store_path(self) -> Path:
        return store_path(self.layout, self.cache_dir)

    def check(self) -> None:
        check_split(self.layout, self.names, self.expect)

    def dataset(self) -> "EpisodicDataset":
        from fewshot_runner.data.base import EpisodicDataset

        return EpisodicDataset(self.layout.name, build_splits(self.layout, self.names, self.expect, self.cache_dir))


# ----------------------------------------------------------------------------- safe unpickling (archive.RestrictedUnpickler)
def load_pickle(path: str | os.PathLike, what: str, fix: str):
    """The object pickled in ``path``, rebuilt by the restricted unpickler (Python 2 pickles read as latin-1).

    Anything else (another class, a torn or foreign file) is a one-line DataError:
    "<path> is not <what> (<why>): <fix>".
    """
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DataError(f"cannot read {path} ({one_line(e)}): {fix}") from None
    except Exception as e:  # noqa: BLE001 - a torn or foreign pickle fails in many ways; all one message
        raise DataError(f"{path} is not {what} ({type(e).__name__}: {one_line(e)[:200]}): {fix}") from None


def get_key(d: dict, key: str):
    """``d[key]`` for a dict pickled by Python 3 (str keys) or read from Python 2 (str or bytes keys)."""
    if key in d:
        return d[key]
    return d[key.encode()]


def as_str(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, (bytes, bytearray)) else str(x)


# ----------------------------------------------------------------------------- decoding
def inspect_published(name: str, what: str, find_layout, shipped_checksum: str, published: Expect,
                      root: str | None, image_size: int, split_dir, expect: Expect | None, cache_dir) -> Inspection:
    """What a published data set's loader would read, found and listed (nothing decoded): its split (the
    shipped one, checksum-checked, or ``split_dir``), the layout ``find_layout(root, image_size)`` finds
    under its root, and the sizes to check (the ``published`` ones unless ``expect`` or ``split_dir``)."""
    check_image_size(image_size)
    names = load_split(name, what, split_dir, shipped_checksum)
    layout = find_layout(resolve_root(name, root), image_size)
    return Inspection(layout, names, published if expect is None and split_dir is None else expect, cache_dir)


def check_image_size(image_size: object, key: str = "data.image_size") -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"{key} must be a positive integer (got {image_size!r})")


def decode_image(data: bytes, image_size: int, channels: int) -> "np.ndarray":
    """Image file bytes (PNG, JPEG, BMP, WebP ...) -> uint8 (channels, image_size, image_size).

    Converted to RGB (``channels`` 3) or luminance L (1) by PIL, then resized to a square with PIL's
    bilinear filter (antialiased when it shrinks, as torchvision's ``Resize``); no crop.
    """
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB" if channels == 3 else "L")
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a.transpose(2, 0, 1) if channels == 3 else a[None]


def decoder(image_size: int, channels: int) -> Callable[[bytes], "np.ndarray"]:
    """A picklable ``decode(bytes) -> (channels, s, s)`` for ``data.decode.decode_files``."""
    return functools.partial(decode_image, image_size=image_size, channels=channels)


def hwc_to_chw(images: "np.ndarray", image_size: int) -> "np.ndarray":
    """uint8 (n, H, W, 3) -> (n, 3, image_size, image_size), resized like ``decode_image`` where H, W differ."""
    import numpy as np
    from PIL import Image

    if images.shape[1:3] == (image_size, image_size):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.uint8)
    for i, im in enumerate(images):
        small = Image.fromarray(np.ascontiguousarray(im)).resize((image_size, image_size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)
    return out


def decode_files_into(out: "np.ndarray", files: list[tuple[Source, str]], what: str, image_size: int,
                      channels: int) -> None:
    """``data.decode.decode_files`` of image files into ``out`` (their rows, in order), with its progress bar."""
    from fewshot_runner.data.decode import decode_files

    decode_files(files, decoder(image_size, channels), (channels, image_size, image_size), what=what,
                 description=f"{what}: decoding {len(files)} images to {image_size}x{image_size}", out=out)


def fingerprint(paths: Sequence[Path]) -> str:
    """A short hash of the paths' names, sizes and modification times: a changed file makes the store stale."""
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
