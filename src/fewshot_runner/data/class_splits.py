"""Class splits: which classes make train / val / test, read from shipped text files, and
"rotations as new classes" (each class turned by 0, 90, 180, 270 degrees counts as four).

Split files: ``<folder>/{train,val,test,trainval}.txt``, one class name a line (``trainval``
optional). The folders shipped with the package lie under ``fewshot_runner/data/splits/<scheme>``
(package data, see ``pyproject.toml``); a data set reads its own scheme folder with
``packaged_split_dir`` and the files with ``load_split_files``.

A rotated class is named ``<base>/rotDDD`` (DDD in 000, 090, 180, 270: degrees counterclockwise,
as ``PIL.Image.rotate(DDD)`` turns), built from the base class's images by
``torch.rot90(x, DDD // 90, dims=(-2, -1))`` (``rotate_classes``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from fewshot_runner.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fewshot_runner.data.base import ClassSplit

SPLIT_NAMES = ("train", "val", "test", "trainval")
ROTATIONS = ("rot000", "rot090", "rot180", "rot270")


# ----------------------------------------------------------------------------- split files
def packaged_split_dir(scheme: str, what: str, generated: Iterable[str] = (), package: str = "fewshot_runner.data",
                       folder: str = "splits"):
    """The shipped folder ``<package>/<folder>/<scheme>`` (an importlib Traversable).

    An unknown scheme is a one-line DataError listing the shipped schemes and the ``generated`` ones
    (schemes the data set computes instead of reading): "unknown <what> split scheme ...".
    """
    from importlib import resources

    splits_root = resources.files(package).joinpath(folder)
    base = splits_root.joinpath(scheme)
    if not base.is_dir():
        known = sorted(p.name for p in splits_root.iterdir() if p.is_dir()) if splits_root.is_dir() else []
        known = sorted(set(known) | set(generated))
        raise DataError(f"unknown {what} split scheme {scheme!r}: use data.split_scheme={' or '.join(known)}")
    return base


def load_split_files(base, line_re: re.Pattern | None = None, line_form: str = "a class name",
                     splits: Iterable[str] = SPLIT_NAMES, optional: Iterable[str] = ("trainval",)) -> dict[str, list[str]]:
    """Class names per split, read from ``<base>/<split>.txt`` (``base``: a folder path or a Traversable).

    Blank lines are skipped, names stripped. A missing non-optional file, a line that does not
    match ``line_re`` (described as ``line_form`` in the message) or a class listed twice is a
    one-line DataError naming the file.
    """
    base = Path(base) if isinstance(base, (str, os.PathLike)) else base
    optional = set(optional)
    out: dict[str, list[str]] = {}
    for split in splits:
        f = base.joinpath(f"{split}.txt")
        if not f.is_file():
            if split in optional:
                continue
            raise DataError(f"split file {f} is missing: reinstall fewshot_runner (its package data must include splits/*/*.txt)")
        names = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if line_re is not None:
            for i, name in enumerate(names):
                if not line_re.match(name):
                    raise DataError(f"line {i + 1} of split file {f} is {name!r}, not {line_form}: fix or restore that file")
        if len(set(names)) != len(names):
            raise DataError(f"split file {f} lists a class twice: fix or restore that file")
        out[split] = names
    return out


# ----------------------------------------------------------------------------- rotations as new classes
def with_rotations(base_names: Iterable[str]) -> list[str]:
    """``<base>/rot000``, ``/rot090``, ``/rot180``, ``/rot270`` for each base class, in that order."""
    return [f"{b}/{r}" for b in base_names for r in ROTATIONS]


def parse_rotation(name: str) -> tuple[str, int]:
    """``"<base>/rotDDD"`` -> (base, quarter turns counterclockwise)."""
    base, rot = name.rsplit("/", 1)
    return base, int(rot[-3:]) // 90


def rotate_classes(images: "torch.Tensor", base_index: "torch.Tensor", quarter_turns: "torch.Tensor") -> "torch.Tensor":
    """Class ``i`` of the result is base class ``base_index[i]`` turned ``quarter_turns[i]`` times
    counterclockwise: (n_base, per_class, ..., H, W) -> a new (len(base_index), per_class, ..., H, W) tensor."""
    import torch

    out = torch.empty((len(base_index), *images.shape[1:]), dtype=images.dtype)
    for k in range(4):
        sel = (quarter_turns % 4 == k).nonzero().squeeze(1)
        if sel.numel():
            out[sel] = torch.rot90(images[base_index[sel]], k, dims=(-2, -1))
    return out


# ----------------------------------------------------------------------------- ClassSplits from names
def build_class_splits(names: dict[str, list[str]], class_images: Callable[[str, list[str]], "torch.Tensor"],
                       order: Iterable[str] = SPLIT_NAMES) -> dict[str, "ClassSplit"]:
    """One ClassSplit per split of ``names`` from ``class_images(split, class_names)`` -> (n_classes, per, C, H, W).

    When trainval is exactly train + val, train and val are views into trainval's tensor: the
    classes are held once. The result is ordered by ``order``.
    """
    from fewshot_runner.data.base import ClassSplit

    splits: dict[str, ClassSplit] = {}
    if "trainval" in names and names["trainval"] == names.get("train", []) + names.get("val", []):
        tv = class_images("trainval", names["trainval"])
        n_train = len(names["train"])
        splits["train"] = ClassSplit.from_class_major("train", tv[:n_train], names["train"])
        splits["val"] = ClassSplit.from_class_major("val", tv[n_train:], names["val"])
        splits["trainval"] = ClassSplit.from_class_major("trainval", tv, names["trainval"])
    for split, cls_names in names.items():
        if split not in splits:
            splits[split] = ClassSplit.from_class_major(split, class_images(split, cls_names), cls_names)
    return {s: splits[s] for s in order if s in splits}
