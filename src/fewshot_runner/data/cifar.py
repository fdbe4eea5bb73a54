"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018), both cut from CIFAR-100's
60,000 32 x 32 RGB images (train and test files together: 600 per class, 3,000 per superclass).

- CIFAR-FS: the 100 classes split at random into 64 / 16 / 20 (``splits/cifar_fs``: fine-label names).
- FC100: split by superclass, 12 / 4 / 4 superclasses (``splits/fc100``: coarse-label names) of 5 classes
  each, so 60 / 20 / 20 classes (the fine labels of those superclasses, in label order), 600 images each.
Both lists were taken from torchmeta's assets (tristandeleu/pytorch-meta,
``torchmeta/datasets/assets/cifar100/{cifar-fs,fc100}``), which follow those papers' split files.

Layout read (under ``$FEWSHOT_DATA/cifar100`` by default, one copy for both): torchvision's
``cifar-100-python/{train,test,meta}`` (or those three files in the root itself), or, when neither is there,
the archive ``cifar-100-python.tar.gz`` itself, its three members read in place (in memory; nothing
extracted; an archive with an unsafe member, a truncated or a corrupt one refused in one line): Python 2 pickles of a
dict with ``data`` (uint8 (n, 3072): 1,024 red, then green, then blue values, row-major), ``fine_labels``,
``coarse_labels``, and ``meta`` with ``fine_label_names`` and ``coarse_label_names``. They are read by a
restricted unpickler (dicts, lists, strings, numpy arrays). Within a class the train file's images come
first, then the test file's, each in file order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_runner.data.archive import read_tar_members, unpickle_member
from fewshot_runner.data.published import (Expect, Inspection, Layout, MissingData, as_str, check_image_size,
                                           fingerprint, get_key, load_pickle, load_split)
from fewshot_runner.data.decode import progress
from fewshot_runner.data.root import resolve_root
from fewshot_runner.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from fewshot_runner.data.base import EpisodicDataset

ROOT_NAME = "cifar100"
FILES = ("train", "test", "meta")
GET = ("get CIFAR-100's python version (cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, or "
       "torchvision.datasets.CIFAR100(root, download=True)) and put it in {root} as it is (it is read in place), or "
       "extract it there so that {root}/cifar-100-python/train, test and meta exist")
TAR = "cifar-100-python.tar.gz"
WHAT_PART = {"train": "a CIFAR-100 python file (a dict with data, fine_labels, coarse_labels)",
             "test": "a CIFAR-100 python file (a dict with data, fine_labels, coarse_labels)",
             "meta": "CIFAR-100's meta file (a dict of label names)"}
#: split folder -> (data set name in messages, what the split files list, published sizes, split files' checksum)
SCHEMES = {
    "cifar_fs": ("CIFAR-FS", "fine", Expect(per_class=600), "14bc061e212cff1b"),
    "fc100": ("FC100", "coarse", Expect(per_class=600, totals={"train": 36000, "val": 12000, "test": 12000}),
              "099b770dbb66c043"),
}
FINE_PER_SUPERCLASS = 5


def _get(root: Path) -> str:
    return GET.format(root=root)


def find_files(root: Path) -> dict[str, Path] | Path:
    """train, test, meta under ``root/cifar-100-python`` or ``root``; else the archive ``root/cifar-100-python.tar.gz``
    (its Path: read in place by ``load_parts``); MissingData names what is not there."""
    if root.exists() and not root.is_dir():
        raise MissingData(f"CIFAR-100 root {root} is a file, not a folder: set data.root to the folder holding "
                          f"cifar-100-python or {TAR}", [], [str(root)], _get(root))
    for base in (root / "cifar-100-python", root):
        if all((base / f).is_file() for f in FILES):
            return {f: base / f for f in FILES}
    if (root / TAR).is_file():
        return root / TAR
    base = root / "cifar-100-python"
    found = [str(b / f) for b in (base, root) for f in FILES if (b / f).is_file()]
    missing = [str(base / f) for f in FILES if not (base / f).is_file()] + [f"or {root / TAR}"]
    what = "" if root.is_dir() else " (the folder does not exist)"
    raise MissingData(f"no CIFAR-100 python files under {root}{what} (missing {missing[0]}): {_get(root)}", found,
                      missing, _get(root))


def load_parts(root: Path) -> tuple[dict[str, object], dict[str, str], list[Path], str, str]:
    """The unpickled train, test and meta objects of the copy under ``root``, how messages name each, the files
    read (for the store's key), the layout's form in words and what a message about them says to do."""
    found = find_files(root)
    if isinstance(found, dict):
        fix = f"replace it with CIFAR-100's python file of that name ({_get(root)})"
        objs = {f: load_pickle(found[f], WHAT_PART[f], fix) for f in FILES}
        return objs, {f: str(found[f]) for f in FILES}, list(found.values()), "CIFAR-100 python files", fix
    tar = found
    names = {f"{base}{f}" for base in ("cifar-100-python/", "") for f in FILES}
    data = read_tar_members(tar, names)
    base = next((b for b in ("cifar-100-python/", "") if all(f"{b}{f}" in data for f in FILES)), None)
    if base is None:
        missing = [f"{tar}:cifar-100-python/{f}" for f in FILES if f"cifar-100-python/{f}" not in data]
        raise MissingData(f"{tar} holds no member {missing[0].split(':', 1)[1]}: it is not CIFAR-100's python "
                          f"version; {_get(root)}", [str(tar)], missing, _get(root))
    fix = f"replace {tar.name} with the official one ({_get(root)})"
    objs = {}
    for f in FILES:
        objs[f] = unpickle_member(data.pop(f"{base}{f}"), f"{tar}:{base}{f}", WHAT_PART[f], fix)
    return objs, {f: f"{tar}:{base}{f}" for f in FILES}, [tar], f"{TAR}, read in place", fix


def read_cifar(objs: dict[str, object], where: dict[str, str], root: Path,
               fix: str) -> tuple["np.ndarray", dict, dict[str, list[str]]]:
    """(images uint8 (60000, 3, 32, 32): train then test, labels {"fine", "coarse"} (n,), names {"fine", "coarse"})
    of the unpickled files ``objs`` (``where``: how messages name each; ``fix``: what they say to do)."""
    import numpy as np

    images, labels = [], {"fine": [], "coarse": []}
    for part in ("train", "test"):
        obj = objs[part]
        try:
            data = np.asarray(get_key(obj, "data"))
            fine, coarse = (np.asarray(get_key(obj, f"{k}_labels"), dtype=np.int64) for k in ("fine", "coarse"))
        except (KeyError, TypeError, AttributeError, ValueError):
            raise DataError(f"{where[part]} is not a dict with data, fine_labels and coarse_labels: {fix}") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(fine) != len(data) \
                or len(coarse) != len(data):
            raise DataError(f"{where[part]}: data is {data.dtype} {data.shape} with {len(fine)} labels, not uint8 "
                            f"(n, 3072) with one label each: {fix}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels["fine"].append(fine)
        labels["coarse"].append(coarse)
    meta = objs["meta"]
    try:
        names = {k: [as_str(n) for n in get_key(meta, f"{k}_label_names")] for k in ("fine", "coarse")}
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"{where['meta']} is not a dict with fine_label_names and coarse_label_names: {fix}") from None
    out = {k: np.concatenate(v) for k, v in labels.items()}
    for k, v in out.items():
        if len(v) and (v.min() < 0 or v.max() >= len(names[k])):
            raise DataError(f"the CIFAR-100 files under {root} label a {k} class {int(v.max())} of "
                            f"{len(names[k])} names: {fix}")
    return np.concatenate(images), out, names


def find_layout(root: Path, scheme: str, image_size: int = 32) -> Layout:
    """The fine classes of the CIFAR-100 files under ``root`` (``superclasses``: coarse name -> its fine names)."""
    import numpy as np

    what, level = SCHEMES[scheme][0], "fine"
    objs, where, files, form, fix = load_parts(root)
    images, labels, names = read_cifar(objs, where, root, fix)
    del objs
    counts = dict(zip(names[level], np.bincount(labels[level], minlength=len(names[level])).tolist()))
    index = {n: i for i, n in enumerate(names[level])}
    superclasses: dict[str, list[str]] = {}
    for f in sorted(set(labels["fine"].tolist())):
        coarse = sorted(set(labels["coarse"][labels["fine"] == f].tolist()))
        if len(coarse) != 1:
            raise DataError(f"the CIFAR-100 files under {root} put class {names['fine'][f]} in {len(coarse)} "
                            f"superclasses: {_get(root)}")
        superclasses.setdefault(names["coarse"][coarse[0]], []).append(names["fine"][f])

    def fill(out: "np.ndarray", classes: list[str]) -> None:
        from fewshot_runner.data.published import hwc_to_chw

        pos = 0
        with progress(len(out), f"{what}: writing {len(out)} images") as advance:
            for c in classes:
                chosen = images[np.flatnonzero(labels[level] == index[c])]
                if image_size != 32:
                    chosen = hwc_to_chw(chosen.transpose(0, 2, 3, 1), image_size)
                out[pos:pos + len(chosen)] = chosen
                pos += len(chosen)
                advance(len(chosen))

    archive = form.startswith(TAR)
    key = {"layout": TAR if archive else "cifar-100-python", "files": fingerprint(files), "image_size": image_size,
           "level": level}
    found = [f"{files[0]} (read in place: {', '.join(where[f].rsplit(':', 1)[1] for f in FILES)})"] if archive \
        else [where[f] for f in FILES]
    return Layout(scheme, what, root, form, found, counts, (3, image_size, image_size), key, fill, _get(root),
                  superclasses)


def fine_classes(names: dict[str, list[str]], layout: Layout, published: bool) -> dict[str, list[str]]:
    """FC100's classes per split: the fine classes of each split's superclasses (published: 5 each)."""
    out = {}
    for s, supers in names.items():
        out[s] = []
        for sup in supers:
            fine = layout.groups.get(sup, [])
            if not fine or (published and len(fine) != FINE_PER_SUPERCLASS):
                raise MissingData(f"FC100 under {layout.root} has {len(fine)} classes of superclass {sup} ({s} split) "
                                  f"where CIFAR-100 has {FINE_PER_SUPERCLASS}: the copy is partial; {layout.get}",
                                  layout.found, [f"classes of superclass {sup}"], layout.get)
            out[s] += fine
    return out


def inspect(scheme: str, root: str | None = None, image_size: int = 32, *,
            split_dir: str | os.PathLike | None = None, expect: Expect | None = None,
            cache_dir: str | os.PathLike | None = None) -> Inspection:
    """What ``CIFAR_FS`` (scheme "cifar_fs") or ``FC100`` ("fc100") would read, found and listed."""
    check_image_size(image_size)
    what, listed, published, checksum = SCHEMES[scheme]
    names = load_split(scheme, what, split_dir, checksum)
    layout = find_layout(resolve_root(ROOT_NAME, root), scheme, image_size)
    if listed == "coarse":
        names = fine_classes(names, layout, split_dir is None)
    return Inspection(layout, names, published if expect is None and split_dir is None else expect, cache_dir)


def inspect_cifar_fs(root: str | None = None, image_size: int = 32, **kw) -> Inspection:
    return inspect("cifar_fs", root, image_size, **kw)


def inspect_fc100(root: str | None = None, image_size: int = 32, **kw) -> Inspection:
    return inspect("fc100", root, image_size, **kw)


def CIFAR_FS(root: str | None = None, image_size: int = 32, *, split_dir: str | os.PathLike | None = None,
             expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> "EpisodicDataset":
    """CIFAR-FS as an EpisodicDataset "cifar_fs": train (64 classes), val (16), test (20), trainval; uint8
    images (n, 3, image_size, image_size), 600 per class, read lazily from the image store.

    root: the folder holding ``cifar-100-python`` or ``cifar-100-python.tar.gz``; None: ``$FEWSHOT_DATA/cifar100``
        (shared with FC100).
    split_dir, expect, cache_dir: as ``miniimagenet.MiniImageNet``.
    """
    return inspect("cifar_fs", root, image_size, split_dir=split_dir, expect=expect, cache_dir=cache_dir).dataset()


def FC100(root: str | None = None, image_size: int = 32, *, split_dir: str | os.PathLike | None = None,
          expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> "EpisodicDataset":
    """FC100 as an EpisodicDataset "fc100": train (60 classes of 12 superclasses), val (20 of 4), test (20 of 4),
    trainval; uint8 images (n, 3, image_size, image_size), 600 per class, read lazily from the image store.

    root: as ``CIFAR_FS``. split_dir, expect, cache_dir: as ``miniimagenet.MiniImageNet``.
    """
    return inspect("fc100", root, image_size, split_dir=split_dir, expect=expect, cache_dir=cache_dir).dataset()


CIFAR_FS.inspect = inspect_cifar_fs  # what `fewshot data check` calls (data/check.py)
FC100.inspect = inspect_fc100
