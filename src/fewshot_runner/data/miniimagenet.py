"""miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017): 64 / 16 / 20
classes of 600 images each, 84 x 84 RGB.

The split ships as ``splits/miniimagenet/{train,val,test}.txt`` (WordNet ids, one a line), read from
Ravi & Larochelle's own ``train.csv`` / ``val.csv`` / ``test.csv`` (twitter-research/meta-learning-lstm,
data/miniImagenet/). Its checksum (``published.split_checksum``) is ``SPLIT_CHECKSUM``.

Layouts read (under the resolved root, ``$FEWSHOT_DATA/miniimagenet`` by default; first match):
  (a) the pickled caches ``mini-imagenet-cache-{train,val,test}.pkl``: a dict with ``image_data``, uint8
      (n, 84, 84, 3), and ``class_dict``, wnid -> list of row indices (as learn2learn and others ship it);
      read by a restricted unpickler (dicts, lists, strings, numpy arrays; nothing else);
  (b) the images folder of Ravi & Larochelle's script: ``images/<wnid><number>.jpg`` beside
      ``train.csv``, ``val.csv``, ``test.csv`` (header ``filename,label``; the label is the wnid);
  (c) the archive of (a) as downloaded, read in place (in memory; nothing extracted): ``mini-imagenet.tar.gz``
      (torchmeta's download, the Google Drive file of renmengye/few-shot-ssl-public) or ``miniImageNet.tar.gz``,
      holding the three pickles at its top or in one folder. An archive with an unsafe member, or a truncated or
      corrupt one, is refused in one line. Each pickle is unpickled as the pass reaches it: its bytes and
      its array are in memory together (about 1.6 GB for the train pickle), beside the arrays read before.
Images are decoded once (RGB, resized to ``image_size`` with PIL's bilinear filter when they are not
already that size) into an image store (``data/published.py``), read lazily.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_runner.data.archive import Source, iter_tar_members, unpickle_member
from fewshot_runner.data.published import (SPLITS, as_str, decode_files_into, Expect, fingerprint, get_key,
                                           hwc_to_chw, inspect_published, Inspection, Layout, load_pickle,
                                           MissingData)
from fewshot_runner.data.decode import progress
from fewshot_runner.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from fewshot_runner.data.base import EpisodicDataset

NAME = "miniimagenet"
WHAT = "miniImageNet"
SPLIT_CHECKSUM = "74b757e3299ec81e"
EXPECT = Expect(per_class=600)
PICKLES = {s: f"mini-imagenet-cache-{s}.pkl" for s in SPLITS}
CSVS = {s: f"{s}.csv" for s in SPLITS}
TARS = ("mini-imagenet.tar.gz", "miniImageNet.tar.gz")  # the archive of the pickles, as its downloads name it
CACHE_WHAT = "a miniImageNet cache (a dict with image_data and class_dict)"
GET = ("get mini-imagenet-cache-{{train,val,test}}.pkl (the pickled caches, e.g. from learn2learn's download links, or "
       "their archive mini-imagenet.tar.gz, read in place) or Ravi & Larochelle's images/ folder with train.csv, "
       "val.csv, test.csv, and put them in {root}")
_WNID = re.compile(r"^n\d{8}$")


def _get(root: Path) -> str:
    return GET.format(root=root)


# ----------------------------------------------------------------------------- (a) pickled caches
def _read_cache_pickle(path: Path, root: Path) -> tuple["np.ndarray", dict[str, list[int]]]:
    """(image_data (n, H, W, 3) uint8, class_dict wnid -> row indices) of one pickled cache, checked."""
    fix = f"replace it with the miniImageNet cache file of that name ({_get(root)})"
    return _check_cache(load_pickle(path, CACHE_WHAT, fix), str(path), fix)


def _check_cache(obj, path: str, fix: str) -> tuple["np.ndarray", dict[str, list[int]]]:
    """(image_data, class_dict) of an unpickled cache, checked; messages name it ``path``."""
    import numpy as np

    try:
        images, class_dict = get_key(obj, "image_data"), get_key(obj, "class_dict")
    except (KeyError, TypeError, AttributeError):
        keys = sorted(map(as_str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path} holds {keys}, not a dict with image_data and class_dict: {fix}") from None
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3):
        what = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{path}: image_data is {what}, not uint8 (n, H, W, 3): {fix}")
    if not isinstance(class_dict, dict):
        raise DataError(f"{path}: class_dict is a {type(class_dict).__name__}, not a dict of wnid -> row indices: "
                        f"{fix}")
    rows: dict[str, list[int]] = {}
    for wnid, idx in class_dict.items():
        try:
            idx = [int(i) for i in idx]
        except (TypeError, ValueError):
            raise DataError(f"{path}: class_dict[{as_str(wnid)!r}] is not a list of row indices: {fix}") from None
        if idx and (min(idx) < 0 or max(idx) >= len(images)):
            raise DataError(f"{path}: class_dict[{as_str(wnid)!r}] names row {max(idx)} of {len(images)} images: {fix}")
        rows[as_str(wnid)] = idx
    return images, rows


def _pickle_layout(root: Path, image_size: int) -> Layout:
    paths = [root / PICKLES[s] for s in SPLITS]
    loaded = {str(path): _read_cache_pickle(path, root) for path in paths}
    return _caches_layout(root, image_size, loaded, "pickled caches", [str(p) for p in paths],
                          {"layout": "pickles", "files": fingerprint(paths), "image_size": image_size})


class _PickleMembers:
    """The archive members that are the pickled caches: at the archive's top or one folder down."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.count("/") <= 1 and name.rsplit("/", 1)[-1] in PICKLES.values()


def _tar_layout(root: Path, tar: Path, image_size: int) -> Layout:
    """(c): the pickled caches read from ``tar`` in one pass, each unpickled from memory as the pass reaches it."""
    fix = f"replace {tar.name} with the archive of the miniImageNet pickles ({_get(root)})"
    split_of = {v: s for s, v in PICKLES.items()}
    where: dict[str, str] = {}
    caches: dict[str, tuple] = {}
    for member, data in iter_tar_members(tar, _PickleMembers()):
        if data is None:
            continue
        s = split_of[member.rsplit("/", 1)[-1]]
        if s in where:
            raise DataError(f"{tar} holds {PICKLES[s]} twice ({where[s]} and {member}): {fix}")
        where[s], name = member, f"{tar}:{member}"
        caches[s] = (name, _check_cache(unpickle_member(data, name, CACHE_WHAT, fix), name, fix))
        del data
    missing = [PICKLES[s] for s in SPLITS if s not in where]
    if missing:
        raise MissingData(f"{tar} holds no member {missing[0]} (at its top or one folder down): it is not the archive "
                          f"of the miniImageNet pickles; {_get(root)}", [str(tar)], [f"{tar}:{m}" for m in missing],
                          _get(root))
    loaded = dict(caches[s] for s in SPLITS)
    return _caches_layout(root, image_size, loaded, f"{tar.name}, read in place",
                          [f"{tar} (read in place: {', '.join(where[s] for s in SPLITS)})"],
                          {"layout": tar.name, "files": fingerprint([tar]), "image_size": image_size})


def _caches_layout(root: Path, image_size: int, loaded: dict[str, tuple["np.ndarray", dict[str, list[int]]]],
                   form: str, found: list[str], key: dict) -> Layout:
    """The Layout of checked caches (``loaded``: how messages name each -> (image_data, class_dict))."""
    counts: dict[str, int] = {}
    where: dict[str, tuple[str, list[int]]] = {}
    for path, (images, rows) in loaded.items():
        for wnid, idx in rows.items():
            if wnid in where:
                raise DataError(f"class {wnid} is both in {where[wnid][0]} and {path}: keep one copy of miniImageNet "
                                f"under {root}")
            where[wnid], counts[wnid] = (path, idx), len(idx)

    def fill(out: "np.ndarray", classes: list[str]) -> None:
        import numpy as np

        pos = 0
        with progress(len(out), f"{WHAT}: writing {len(out)} images") as advance:
            for wnid in classes:
                path, idx = where[wnid]
                out[pos:pos + len(idx)] = hwc_to_chw(loaded[path][0][np.asarray(idx, dtype=np.int64)], image_size)
                pos += len(idx)
                advance(len(idx))
        loaded.clear()

    return Layout(NAME, WHAT, root, form, found, counts, (3, image_size, image_size), key, fill, _get(root))


# ----------------------------------------------------------------------------- (b) images + csv
def _read_csv(path: Path, root: Path) -> list[tuple[str, str]]:
    """(filename, wnid) rows of a Ravi & Larochelle split csv (header ``filename,label``)."""
    fix = f"replace it with Ravi & Larochelle's {path.name} ({_get(root)})"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}): {fix}") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path} does not start with the header filename,label: {fix}")
    out = []
    for i, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        bad_name = "/" in row[0] or "\\" in row[0] or row[0].startswith(".")
        if len(row) != 2 or not _WNID.match(row[1].strip()) or bad_name:
            raise DataError(f"line {i} of {path} is {','.join(row)!r}, not <file name>,<wnid>: {fix}")
        out.append((row[0].strip(), row[1].strip()))
    return out


def _folder_layout(root: Path, image_size: int) -> Layout:
    images_dir = root / "images"
    files: dict[str, list[str]] = {}
    for s in SPLITS:
        for filename, wnid in _read_csv(root / CSVS[s], root):
            files.setdefault(wnid, []).append(filename)
    present = set(os.listdir(images_dir))
    absent = [f for names in files.values() for f in names if f not in present]
    found = [str(root / CSVS[s]) for s in SPLITS] + [f"{images_dir} ({len(present)} files)"]
    if absent:
        raise MissingData(f"{images_dir} lacks {absent[0]} ({len(absent)} of the images the csv files list): the copy "
                          f"is partial; {_get(root)}", found, [str(images_dir / f) for f in absent], _get(root))
    src = Source("dir", str(images_dir))

    def fill(out: "np.ndarray", classes: list[str]) -> None:
        decode_files_into(out, [(src, f) for c in classes for f in files[c]], WHAT, image_size, 3)

    key = {"layout": "images", "files": fingerprint([root / CSVS[s] for s in SPLITS] + [images_dir]),
           "n_files": sum(map(len, files.values())), "image_size": image_size}
    return Layout(NAME, WHAT, root, "images folder + csv", found, {c: len(v) for c, v in files.items()},
                  (3, image_size, image_size), key, fill, _get(root))


# ----------------------------------------------------------------------------- locating
def find_layout(root: Path, image_size: int = 84) -> Layout:
    """The first complete layout under ``root`` (pickles, then images + csv); MissingData names what is not there."""
    if root.exists() and not root.is_dir():
        raise MissingData(f"{WHAT} root {root} is a file, not a folder: set data.root to the folder holding the data",
                          [], [str(root)], _get(root))
    pickles = [root / PICKLES[s] for s in SPLITS]
    folder = [root / CSVS[s] for s in SPLITS] + [root / "images"]
    have_p, have_f = [p for p in pickles if p.is_file()], [p for p in folder if p.exists()]
    if len(have_p) == len(pickles):
        return _pickle_layout(root, image_size)
    if len(have_f) == len(folder) and (root / "images").is_dir():
        return _folder_layout(root, image_size)
    tars = [root / t for t in TARS if (root / t).is_file()]
    if tars and not have_p:
        return _tar_layout(root, tars[0], image_size)
    if have_p or have_f:  # a partial copy of one layout: name what it lacks
        want = pickles if len(have_p) >= len(have_f) else folder
        missing = [str(p) for p in want if not p.exists()]
        raise MissingData(f"{WHAT} under {root} lacks {missing[0]} ({len(missing)} of {len(want)} files missing): "
                          f"{_get(root)}", [str(p) for p in have_p + have_f], missing, _get(root))
    what = "" if root.is_dir() else " (the folder does not exist)"
    raise MissingData(f"no {WHAT} data under {root}{what}: {_get(root)} (or set data.root / $FEWSHOT_DATA)", [],
                      [str(p) for p in pickles] + [f"or {', '.join(str(p) for p in folder)}"], _get(root))


# ----------------------------------------------------------------------------- entry point
def inspect(root: str | None = None, image_size: int = 84, *, split_dir: str | os.PathLike | None = None,
            expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> Inspection:
    """What ``MiniImageNet`` would read (its arguments), found and listed but not decoded."""
    return inspect_published(NAME, WHAT, find_layout, SPLIT_CHECKSUM, EXPECT, root, image_size, split_dir, expect,
                             cache_dir)


def MiniImageNet(root: str | None = None, image_size: int = 84, *, split_dir: str | os.PathLike | None = None,
                 expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> "EpisodicDataset":
    """miniImageNet as an EpisodicDataset "miniimagenet": splits train (64 classes), val (16), test (20),
    trainval, each holding uint8 images (n, 3, image_size, image_size) read lazily from the image store.

    root: the folder with the data (layouts in the module docstring); None: ``$FEWSHOT_DATA/miniimagenet``.
    split_dir, expect, cache_dir (tests and tools): split files from this folder instead of the shipped
        ones (then no published sizes are checked unless ``expect`` gives them), where the store goes.
    """
    return inspect(root, image_size, split_dir=split_dir, expect=expect, cache_dir=cache_dir).dataset()


MiniImageNet.inspect = inspect  # what `fewshot data check` calls (data/check.py)
