"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) as an in-memory EpisodicDataset.

Classes are (character, rotation) pairs of the Vinyals et al. (2016) split, each character in
four rotations: train 4112, val 688, test 1692 classes (trainval 4800), 20 images each.
``split_scheme="lake"``: Lake et al.'s (2015) and Koch et al.'s (2015) protocol, upright characters
only: the background set's 964 characters (train 732, val 232: 6 whole background alphabets) and
the evaluation set's 659 for the test; ``within_alphabet=True`` draws each validation and test
episode's classes from one alphabet (``ClassSplit.class_groups``).

Where the data is read from (under the resolved root, first match per image set):
  (a) ``omniglot-py/images_background/<Alphabet>/characterNN/*.png`` (torchvision's download),
  (b) ``images_background/<Alphabet>/characterNN/*.png`` (an extracted tree),
  (c) ``images_background.zip`` or ``omniglot-py/images_background.zip``, read in place
      (no extraction, no md5 check), and the same for ``images_evaluation``.

Decoding, done once per character image (32,460 PNGs) and cached: 105x105 mode-"1" PNG ->
``convert("L")`` -> PIL ``resize((s, s), BILINEAR)`` (PIL's bilinear is antialiased when it
shrinks; the same as torchvision's ``Resize``) -> inverted, so strokes are bright and the
background is 0 -> uint8.

Rotation: ``rotDDD`` means DDD degrees counterclockwise, as ``PIL.Image.rotate(DDD)`` (and the
Prototypical Networks code) does it; it is applied after decoding as
``torch.rot90(img, DDD // 90, dims=(-2, -1))``, which turns counterclockwise.

Cache: one ``torch.save`` file of tensors, strings and ints (loaded with
``weights_only=True``), written atomically, keyed by (format version, image size, file count,
character names); a stale one is rebuilt, a corrupt one is rebuilt with a warning. It lives in
the first of: the ``cache_dir`` argument, ``$FEWSHOT_CACHE``, ``<root>/.fewshot_cache`` when
the root is writable, ``~/.cache/fewshot``. Outside the root its name carries a hash of the
root path, so two roots never share a file.

What is Omniglot's alone is here: the two image sets and their layouts, the PNG decoding, the
cache key, the split schemes. The machinery every data set shares lives beside it: ``root``
(where the data is), ``archive`` (zip members read in place, unsafe names refused), ``decode``
(the forked decoding pool with its progress bar), ``cache`` (the decoded-tensor cache) and
``class_splits`` (split files, rotations as new classes); ``docs/adding_a_dataset.md`` walks
through them.

This module imports neither torch nor torchvision at import time (torchvision is needed only
for ``download=True``; torch is imported by the functions that use it).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from fewshot_runner.data import cache as _cache
from fewshot_runner.data.archive import Source, tree_files, zip_file_members
from fewshot_runner.data.class_splits import (ROTATIONS, SPLIT_NAMES, build_class_splits, load_split_files,
                                              packaged_split_dir, parse_rotation, rotate_classes)
from fewshot_runner.data.decode import ImageSpec, decode_files
from fewshot_runner.data.root import one_line as _one_line
from fewshot_runner.data.root import resolve_root as _resolve_root
from fewshot_runner.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from fewshot_runner.data.base import ClassSplit, EpisodicDataset

NAME = "omniglot"
IMAGE_SETS = ("images_background", "images_evaluation")
CACHE_VERSION = 1
CACHE_FORMAT = "fewshot_runner.omniglot"
_CLASS_RE = re.compile(r"^([^/\\]+)/([^/\\]+)/rot(000|090|180|270)$")
_CHUNK = 400  # images per decoding job
_POOL_MIN_IMAGES = 2000  # below this a process pool costs more than it saves
_ROTATIONS = ROTATIONS


# ----------------------------------------------------------------------------- split files
# The MAML paper's Omniglot protocol (Finn et al. 2017, its data_generator.py): all 1,623 characters of
# both image sets shuffled and cut into 1,100 train, 100 validation and 423 test characters, so test
# characters share alphabets with training ones (the Vinyals split holds out whole alphabets).
MAML_SPLIT = {"train": 1100, "val": 100}  # the rest (423) is test
MAML_SPLIT_SEED = 1
GENERATED_SCHEMES = ("maml",)
# the folders of data/splits/ that hold Omniglot class lists (the other folders there are other data sets')
SHIPPED_SCHEMES = ("lake", "vinyals")


def random_character_split(char_names: list[str], n_train: int = MAML_SPLIT["train"], n_val: int = MAML_SPLIT["val"],
                           seed: int = MAML_SPLIT_SEED) -> dict[str, list[str]]:
    """Split scheme "maml": the characters (sorted, then shuffled by ``random.Random(seed)``) cut into
    n_train / n_val / the rest, each character in its four rotations, as class names per split
    (train, val, test, trainval).  Deterministic for a given set of characters; it follows the MAML
    code's protocol, not its exact characters (that split depends on ``os.listdir`` order)."""
    import random

    chars = sorted(char_names)
    if len(chars) < n_train + n_val + 1:
        raise DataError(f"data.split_scheme=maml needs more than {n_train + n_val} characters, the data has {len(chars)}: "
                        f"use the full Omniglot (images_background + images_evaluation) or data.split_scheme=vinyals")
    random.Random(seed).shuffle(chars)
    parts = {"train": chars[:n_train], "val": chars[n_train:n_train + n_val], "test": chars[n_train + n_val:]}
    out = {k: [f"{c}/{r}" for c in sorted(v) for r in ROTATIONS] for k, v in parts.items()}
    out["trainval"] = out["train"] + out["val"]
    return out


def load_split_names(scheme: str = "vinyals", split_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Class names per split, read from ``<split_dir>/{train,val,test,trainval}.txt``.

    Without ``split_dir`` the files shipped in the package (``fewshot_runner/data/splits/<scheme>``)
    are used. Each line is ``Alphabet/characterNN/rotDDD``; ``trainval`` is optional.
    """
    if split_dir is None and scheme not in SHIPPED_SCHEMES:
        known = " or ".join(sorted({*SHIPPED_SCHEMES, *GENERATED_SCHEMES}))
        raise DataError(f"unknown Omniglot split scheme {scheme!r}: use data.split_scheme={known}")
    base = packaged_split_dir(scheme, "Omniglot", GENERATED_SCHEMES) if split_dir is None else Path(split_dir)
    return load_split_files(base, _CLASS_RE, "Alphabet/characterNN/rotDDD")


# ----------------------------------------------------------------------------- locating the data
def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` (``~`` expanded), else ``$FEWSHOT_DATA/omniglot``, else ``~/.cache/fewshot/omniglot``."""
    return _resolve_root(NAME, root)


@dataclass(frozen=True)
class _Source(Source):
    """One image set: a folder ``<...>/images_background`` or a zip holding that folder."""

    set_name: str = ""


def find_sources(root: Path) -> dict[str, _Source]:
    """The image sets present under ``root`` (layouts a, b, c; first match wins)."""
    found: dict[str, _Source] = {}
    for set_name in IMAGE_SETS:
        candidates = [("dir", root / "omniglot-py" / set_name), ("dir", root / set_name),
                      ("zip", root / f"{set_name}.zip"), ("zip", root / "omniglot-py" / f"{set_name}.zip")]
        for kind, path in candidates:
            if (path.is_dir() if kind == "dir" else path.is_file()):
                found[set_name] = _Source(kind, str(path), set_name)
                break
    return found


def _list_source(src: _Source) -> dict[str, list[str]]:
    """``"Alphabet/characterNN"`` -> sorted member paths (zip names, or paths relative to the folder)."""
    chars: dict[str, list[str]] = {}
    if src.kind == "zip":
        for name in zip_file_members(src.path):  # refuses unsafe member names
            parts = name.split("/")
            if len(parts) != 4 or parts[0] != src.set_name or not parts[3].lower().endswith(".png"):
                continue
            chars.setdefault(f"{parts[1]}/{parts[2]}", []).append(name)
    else:
        for rel in tree_files(src.path, depth=3, what="Omniglot"):
            if rel.lower().endswith(".png"):
                chars.setdefault(rel.rsplit("/", 1)[0], []).append(rel)
    for members in chars.values():
        members.sort()
    return chars


@dataclass
class _Listing:
    """Every character found, in a fixed order, with where its images are."""

    names: list[str]  # "Alphabet/characterNN", sorted
    where: dict[str, tuple[_Source, list[str]]]
    per_class: int
    file_count: int

    def files(self) -> list[tuple[_Source, str]]:
        """(source, member) of every image, character by character in ``names`` order."""
        out: list[tuple[_Source, str]] = []
        for key in self.names:
            src, members = self.where[key]
            out += [(src, m) for m in members]
        return out


def list_characters(root: Path, sources: dict[str, _Source]) -> _Listing:
    where: dict[str, tuple[_Source, list[str]]] = {}
    for set_name in IMAGE_SETS:
        src = sources[set_name]
        chars = _list_source(src)
        if not chars:
            raise DataError(f"{src.path} holds no {set_name}/<Alphabet>/characterNN/*.png images: "
                            f"replace it with the official Omniglot {set_name}.zip (or its extracted folder)")
        for key, members in chars.items():
            if key in where:
                raise DataError(f"character {key} is both in {where[key][0].path} and {src.path}: keep one copy of Omniglot under {root}")
            where[key] = (src, members)
    names = sorted(where)
    counts = {len(where[k][1]) for k in names}
    if len(counts) != 1:
        most = max(counts, key=lambda c: sum(len(where[k][1]) == c for k in names))
        odd = next(k for k in names if len(where[k][1]) != most)
        raise DataError(f"character {odd} under {root} has {len(where[odd][1])} images where the others have {most}: "
                        f"the data is incomplete, download it again")
    return _Listing(names, where, counts.pop(), sum(len(where[k][1]) for k in names))


# ----------------------------------------------------------------------------- decoding
def image_spec(image_size: int = 28, **_) -> ImageSpec:
    """How an Omniglot image file becomes a stored image (and how ``fewshot predict`` converts the user's):
    gray, resized to image_size, inverted (``data.decode.ImageSpec``).  Other data keys are not used."""
    return ImageSpec(1, image_size, image_size, invert=True)


def decode_image(data: bytes, image_size: int) -> "np.ndarray":
    """PNG bytes -> (image_size, image_size) uint8, strokes bright on a 0 background: ``convert("L")``, PIL
    bilinear resize, ``255 - x`` (:func:`image_spec`)."""
    return image_spec(image_size).decode(data)[0]


def decode_all(listing: _Listing, image_size: int, workers: int | None = None) -> "torch.Tensor":
    """All images of all characters -> uint8 (n_characters, per_class, image_size, image_size).

    ``data.decode.decode_files`` with Omniglot's PNG decoding: a rich progress bar, a pool of forked
    processes on Linux with 2+ CPUs and enough images (about 1.8x faster on 2 idle cores), decoding
    here if the pool fails.
    """
    import torch

    s = image_size
    flat = decode_files(listing.files(), functools.partial(decode_image, image_size=s), (s, s), what="Omniglot",
                        description=f"Omniglot: decoding {listing.file_count} images to {s}x{s}", workers=workers,
                        chunk=_CHUNK, pool_min=_POOL_MIN_IMAGES)
    return torch.from_numpy(flat).view(len(listing.names), listing.per_class, s, s)


# ----------------------------------------------------------------------------- cache
def cache_path(root: Path, image_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the decoded tensor is cached (see the module docstring for the rules)."""
    return _cache.cache_path(root, f"omniglot_{image_size}", cache_dir)


def _cache_key(listing: _Listing, image_size: int) -> dict:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "image_size": image_size,
            "file_count": listing.file_count, "per_class": listing.per_class, "names": list(listing.names)}


def load_cache(path: Path, listing: _Listing, image_size: int) -> "torch.Tensor | None":
    """The cached images if ``path`` holds a valid, current cache; None otherwise (warns if corrupt)."""
    import torch

    want = (len(listing.names), listing.per_class, image_size, image_size)
    obj = _cache.load_cache(path, _cache_key(listing, image_size), "Omniglot", {"images": (torch.uint8, want)})
    return None if obj is None else obj["images"]


def save_cache(path: Path, listing: _Listing, image_size: int, images: "torch.Tensor") -> bool:
    """Write the cache atomically (temp file + os.replace); warn and go on if that fails."""
    return _cache.save_cache(path, {**_cache_key(listing, image_size), "images": images.contiguous()}, "Omniglot")


# ----------------------------------------------------------------------------- splits
def build_splits(images: "torch.Tensor", char_names: list[str], split_names: dict[str, list[str]],
                 rotations: bool = True, where: str = "the data") -> dict[str, "ClassSplit"]:
    """ClassSplits of (character, rotation) classes from (n_chars, per, H, W) uint8 images."""
    import torch

    index = {name: i for i, name in enumerate(char_names)}
    per_char = images.unsqueeze(2)  # (n_chars, per, 1, H, W)

    def class_images(split: str, names: list[str]) -> torch.Tensor:
        parsed = [parse_rotation(n) for n in names]
        missing = [c for c, _ in parsed if c not in index]
        if missing:
            raise DataError(f"the {split} split names {missing[0]} ({len(set(missing))} characters in all) but {where} has no "
                            f"such character: the data is incomplete, download it again")
        idx = torch.tensor([index[c] for c, _ in parsed], dtype=torch.long)
        turns = torch.tensor([k for _, k in parsed], dtype=torch.long)
        return rotate_classes(per_char, idx, turns)

    names = {s: [n for n in v if rotations or n.endswith("/rot000")] for s, v in split_names.items()}
    return build_class_splits(names, class_images, SPLIT_NAMES)


# ----------------------------------------------------------------------------- download
def _download(root: Path, missing: Iterable[str]) -> None:
    try:
        from torchvision.datasets import Omniglot as TorchvisionOmniglot
    except ImportError as e:
        raise DataError(f"data.download=true needs torchvision ({_one_line(e)}): pip install torchvision, "
                        f"or put images_background.zip and images_evaluation.zip under {root}") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {root} to download Omniglot into ({_one_line(e)}): set data.root to a writable folder") from None
    for set_name in missing:
        try:
            TorchvisionOmniglot(str(root), background=set_name == "images_background", download=True)
        except Exception as e:  # noqa: BLE001 - network, disk, checksum: all one message
            raise DataError(f"downloading Omniglot {set_name} into {root} failed ({type(e).__name__}: "
                            f"{_one_line(e)[:300]}): check the network, or put {set_name}.zip there by hand") from None


# ----------------------------------------------------------------------------- entry point
def Omniglot(root: str | None = None, download: bool = False, image_size: int = 28, split_scheme: str = "vinyals",
             rotations: bool = True, within_alphabet: bool = False, *, split_dir: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None, workers: int | None = None) -> "EpisodicDataset":
    """Omniglot as an EpisodicDataset named "omniglot" with splits train, val, test, trainval.

    root: folder holding the data (layouts in the module docstring); None: ``$FEWSHOT_DATA/omniglot``,
        else ``~/.cache/fewshot/omniglot``.
    download: fetch the missing image sets with torchvision (needs internet).
    image_size: side of the square images; each split holds uint8 images (n, 1, image_size, image_size).
    split_scheme: "vinyals" (the split files shipped in the package: Vinyals et al. 2016, whole alphabets
        held out, as the ProtoNet and Matching Networks papers) or "maml" (the MAML paper's protocol:
        a seeded random split of all characters, 1,100 / 100 / 423, see ``random_character_split``) or "lake"
        (Lake et al. 2015, Koch et al. 2015: the background set's 964 characters for training and validation,
        the evaluation set's 659 for the test; no rotations; validation holds out 6 whole background alphabets,
        see ``splits/lake``).
    rotations: (character, rotation) classes as in the split files; False keeps rot000 classes only.
    within_alphabet: validation and test episodes take all their classes from one alphabet (the harder
        one-shot test of Lake et al. and Koch et al.; ``ClassSplit.class_groups``); training episodes still
        draw from every training class.
    split_dir, cache_dir, workers: for tests and tools (split files from a folder, where the cache
        goes, decoding processes); Hydra configs do not set them.
    """
    from fewshot_runner.data.base import EpisodicDataset

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"data.image_size must be a positive integer (got {image_size!r})")
    generated = split_scheme in GENERATED_SCHEMES and split_dir is None
    split_names = None if generated else load_split_names(split_scheme, split_dir)
    root_path = resolve_root(root)
    if root_path.exists() and not root_path.is_dir():
        raise DataError(f"Omniglot root {root_path} is a file, not a folder: set data.root (or $FEWSHOT_DATA) to the folder "
                        f"holding images_background.zip and images_evaluation.zip")
    sources = find_sources(root_path)
    missing = [s for s in IMAGE_SETS if s not in sources]
    if missing and download:
        _download(root_path, missing)
        sources = find_sources(root_path)
        missing = [s for s in IMAGE_SETS if s not in sources]
        if missing:
            raise DataError(f"torchvision's Omniglot download left no {missing[0]} under {root_path}: delete "
                            f"{root_path / 'omniglot-py'} and try again, or put {missing[0]}.zip there by hand")
    if len(missing) == len(IMAGE_SETS):
        what = "" if root_path.is_dir() else " (the folder does not exist)"
        raise DataError(f"no Omniglot data under {root_path}{what}: put images_background.zip and images_evaluation.zip there "
                        f"(or set data.root / $FEWSHOT_DATA), or pass data.download=true to fetch it")
    if missing:
        raise DataError(f"Omniglot under {root_path} has {IMAGE_SETS[1 - IMAGE_SETS.index(missing[0])]} but no {missing[0]}: "
                        f"put {missing[0]}.zip there, or pass data.download=true to fetch it")

    listing = list_characters(root_path, sources)
    if split_names is None:
        split_names = random_character_split(listing.names)
    path = cache_path(root_path, image_size, cache_dir)
    images = load_cache(path, listing, image_size)
    if images is None:
        images = decode_all(listing, image_size, workers)
        save_cache(path, listing, image_size, images)
    splits = build_splits(images, listing.names, split_names, rotations, where=str(root_path))
    if within_alphabet:
        for name in ("val", "test"):
            if name in splits:
                splits[name].class_groups = alphabet_groups(splits[name].class_names)
    return EpisodicDataset("omniglot", splits)


Omniglot.image_spec = image_spec  # the conversion `fewshot predict` applies to the user's image files


def alphabet_groups(class_names: list[str]) -> "torch.Tensor":
    """The alphabet of each ``Alphabet/characterNN/rotDDD`` class as a group id (alphabets numbered in sorted
    order): long (n_classes,), for ``ClassSplit.class_groups``."""
    import torch

    alphabets = [n.split("/", 1)[0] for n in class_names]
    ids = {a: i for i, a in enumerate(sorted(set(alphabets)))}
    return torch.tensor([ids[a] for a in alphabets], dtype=torch.long)
