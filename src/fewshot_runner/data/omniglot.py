"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) as an in-memory EpisodicDataset.

Classes are (character, rotation) pairs of the Vinyals et al. (2016) split, each character in
four rotations: train 4112, val 688, test 1692 classes (trainval 4800), 20 images each.

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

This module imports neither torch nor torchvision at import time (torchvision is needed only
for ``download=True``; torch is imported by the functions that use it).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from fewshot_runner.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from fewshot_runner.data.base import ClassSplit, EpisodicDataset

IMAGE_SETS = ("images_background", "images_evaluation")
SPLIT_NAMES = ("train", "val", "test", "trainval")
CACHE_VERSION = 1
_CLASS_RE = re.compile(r"^([^/\\]+)/([^/\\]+)/rot(000|090|180|270)$")
_CHUNK = 400  # images per decoding job
_POOL_MIN_IMAGES = 2000  # below this a process pool costs more than it saves


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- split files
# The MAML paper's Omniglot protocol (Finn et al. 2017, its data_generator.py): all 1,623 characters of
# both image sets shuffled and cut into 1,100 train, 100 validation and 423 test characters, so test
# characters share alphabets with training ones (the Vinyals split holds out whole alphabets).
MAML_SPLIT = {"train": 1100, "val": 100}  # the rest (423) is test
MAML_SPLIT_SEED = 1
GENERATED_SCHEMES = ("maml",)
_ROTATIONS = ("rot000", "rot090", "rot180", "rot270")


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
    out = {k: [f"{c}/{r}" for c in sorted(v) for r in _ROTATIONS] for k, v in parts.items()}
    out["trainval"] = out["train"] + out["val"]
    return out


def load_split_names(scheme: str = "vinyals", split_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Class names per split, read from ``<split_dir>/{train,val,test,trainval}.txt``.

    Without ``split_dir`` the files shipped in the package (``fewshot_runner/data/splits/<scheme>``)
    are used. Each line is ``Alphabet/characterNN/rotDDD``; ``trainval`` is optional.
    """
    if split_dir is None:
        from importlib import resources

        splits_root = resources.files("fewshot_runner.data").joinpath("splits")
        base = splits_root.joinpath(scheme)
        if not base.is_dir():
            known = sorted(p.name for p in splits_root.iterdir() if p.is_dir()) if splits_root.is_dir() else []
            known = sorted(set(known) | set(GENERATED_SCHEMES))
            raise DataError(f"unknown Omniglot split scheme {scheme!r}: use data.split_scheme={' or '.join(known)}")
    else:
        base = Path(split_dir)
    out: dict[str, list[str]] = {}
    for split in SPLIT_NAMES:
        f = base.joinpath(f"{split}.txt")
        if not f.is_file():
            if split == "trainval":
                continue
            raise DataError(f"split file {f} is missing: reinstall fewshot_runner (its package data must include splits/*/*.txt)")
        names = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for i, name in enumerate(names):
            if not _CLASS_RE.match(name):
                raise DataError(f"line {i + 1} of split file {f} is {name!r}, not Alphabet/characterNN/rotDDD: fix or restore that file")
        if len(set(names)) != len(names):
            raise DataError(f"split file {f} lists a class twice: fix or restore that file")
        out[split] = names
    return out


# ----------------------------------------------------------------------------- locating the data
def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` (``~`` expanded), else ``$FEWSHOT_DATA/omniglot``, else ``~/.cache/fewshot/omniglot``."""
    if root not in (None, ""):
        return Path(os.path.expanduser(os.fspath(root))).absolute()
    env = os.environ.get("FEWSHOT_DATA")
    if env:
        return (Path(os.path.expanduser(env)) / "omniglot").absolute()
    return Path.home() / ".cache" / "fewshot" / "omniglot"


@dataclass(frozen=True)
class _Source:
    """One image set: a folder ``<...>/images_background`` or a zip holding that folder."""

    set_name: str
    kind: str  # "dir" or "zip"
    path: str


def find_sources(root: Path) -> dict[str, _Source]:
    """The image sets present under ``root`` (layouts a, b, c; first match wins)."""
    found: dict[str, _Source] = {}
    for set_name in IMAGE_SETS:
        candidates = [("dir", root / "omniglot-py" / set_name), ("dir", root / set_name),
                      ("zip", root / f"{set_name}.zip"), ("zip", root / "omniglot-py" / f"{set_name}.zip")]
        for kind, path in candidates:
            if (path.is_dir() if kind == "dir" else path.is_file()):
                found[set_name] = _Source(set_name, kind, str(path))
                break
    return found


def _unsafe_member(name: str) -> bool:
    """A zip member name that is absolute or climbs out with ``..``."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return any(part == ".." for part in re.split(r"[/\\]", name))


def _list_source(src: _Source) -> dict[str, list[str]]:
    """``"Alphabet/characterNN"`` -> sorted member paths (zip names, or paths relative to the folder)."""
    chars: dict[str, list[str]] = {}
    if src.kind == "zip":
        try:
            with zipfile.ZipFile(src.path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise DataError(f"{src.path} is not a readable zip file ({_one_line(e)}): delete it and download it again") from None
        for info in infos:
            name = info.filename
            if _unsafe_member(name):
                raise DataError(f"{src.path} holds an unsafe member name {name!r} (absolute or with '..'); "
                                f"refusing it: replace the zip with the official one")
            parts = name.split("/")
            if info.is_dir() or len(parts) != 4 or parts[0] != src.set_name or not parts[3].lower().endswith(".png"):
                continue
            chars.setdefault(f"{parts[1]}/{parts[2]}", []).append(name)
    else:
        base = Path(src.path)
        try:
            for alphabet in sorted(p for p in base.iterdir() if p.is_dir()):
                for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                    pngs = sorted(f.name for f in char.iterdir() if f.name.lower().endswith(".png") and f.is_file())
                    if pngs:
                        chars[f"{alphabet.name}/{char.name}"] = [f"{alphabet.name}/{char.name}/{f}" for f in pngs]
        except OSError as e:
            raise DataError(f"cannot read the Omniglot folder {base} ({_one_line(e)}): check its permissions") from None
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
_OPEN_ZIPS: dict[str, zipfile.ZipFile] = {}


def _read_member(kind: str, path: str, member: str) -> bytes:
    if kind == "zip":
        zf = _OPEN_ZIPS.get(path)
        if zf is None:
            zf = _OPEN_ZIPS[path] = zipfile.ZipFile(path)
        return zf.read(member)
    with open(os.path.join(path, *member.split("/")), "rb") as f:
        return f.read()


def _close_zips() -> None:
    while _OPEN_ZIPS:
        _OPEN_ZIPS.popitem()[1].close()


def decode_image(data: bytes, image_size: int) -> "np.ndarray":
    """PNG bytes -> (image_size, image_size) uint8, strokes bright on a 0 background."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        gray = im.convert("L")
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return 255 - np.asarray(gray, dtype=np.uint8)


def _decode_job(job: tuple[str, str, list[str], int]) -> tuple["np.ndarray | None", str | None]:
    """Decode one chunk of members; returns (images, None) or (None, one-line error)."""
    import numpy as np

    kind, path, members, image_size = job
    out = np.empty((len(members), image_size, image_size), dtype=np.uint8)
    for i, member in enumerate(members):
        try:
            out[i] = decode_image(_read_member(kind, path, member), image_size)
        except Exception as e:  # noqa: BLE001 - reported to the parent as a DataError
            where = f"{path}:{member}" if kind == "zip" else os.path.join(path, member)
            return None, f"{where} ({type(e).__name__}: {_one_line(e)})"
    return out, None


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _start_pool(jobs: list, workers: int):
    """A fork-based process pool with every job submitted, or (None, None) if none can be had."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a threaded process; the workers touch no lock of those threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            futures = {pool.submit(_decode_job, job): j for j, job in enumerate(jobs)}
        return pool, futures
    except (OSError, ValueError, RuntimeError) as e:
        warnings.warn(f"Omniglot: no process pool ({type(e).__name__}: {_one_line(e)}); decoding in this process",
                      stacklevel=4)
        return None, None


def decode_all(listing: _Listing, image_size: int, workers: int | None = None) -> "torch.Tensor":
    """All images of all characters -> uint8 (n_characters, per_class, image_size, image_size).

    Shows a rich progress bar. On Linux with 2+ CPUs and enough images, decodes in a pool of
    forked processes (about 1.8x faster on 2 idle cores); falls back to decoding here if the
    pool fails. Fork, not spawn: spawned workers re-run an unguarded ``__main__`` script (a
    plain script calling ``Omniglot()`` at top level would decode the data set three times);
    the forked workers only run zipfile/PIL/numpy code, never torch, CUDA or the caller's threads.
    """
    import numpy as np
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    jobs: list[tuple[str, str, list[str], int]] = []
    offsets: list[int] = []
    pending: list[str] = []
    pending_src: _Source | None = None
    done_items = 0

    def flush() -> None:
        nonlocal pending, done_items
        if pending:
            jobs.append((pending_src.kind, pending_src.path, pending, image_size))
            offsets.append(done_items)
            done_items += len(pending)
            pending = []

    for key in listing.names:
        src, members = listing.where[key]
        if pending_src is not None and src != pending_src:
            flush()
        pending_src = src
        pending = pending + members
        if len(pending) >= _CHUNK:
            flush()
    flush()

    n = listing.file_count
    flat = np.empty((n, image_size, image_size), dtype=np.uint8)
    todo = set(range(len(jobs)))
    workers = _default_workers() if workers is None else max(1, int(workers))

    def store(j: int, result: tuple) -> None:
        images, err = result
        if err is not None:
            raise DataError(f"cannot decode Omniglot image {err}: the data is corrupt, download it again")
        flat[offsets[j]: offsets[j] + len(images)] = images
        todo.discard(j)

    _close_zips()  # no open zip (and its file offset) may be shared with forked workers
    pool, futures = None, None
    if workers > 1 and n >= _POOL_MIN_IMAGES and len(jobs) > 1 and sys.platform.startswith("linux"):
        pool, futures = _start_pool(jobs, min(workers, len(jobs)))  # before the progress bar's thread starts
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), transient=False, disable=n < 1000) as progress:
            task = progress.add_task(f"Omniglot: decoding {n} images to {image_size}x{image_size}", total=n)
            if futures is not None:
                from concurrent.futures import as_completed
                from concurrent.futures.process import BrokenProcessPool

                try:
                    for fut in as_completed(futures):
                        j = futures[fut]
                        store(j, fut.result())
                        progress.advance(task, len(jobs[j][2]))
                except (BrokenProcessPool, OSError, EOFError) as e:
                    warnings.warn(f"Omniglot: parallel decoding failed ({type(e).__name__}: {_one_line(e)}); "
                                  f"decoding the rest in this process", stacklevel=3)
            for j in sorted(todo):
                store(j, _decode_job(jobs[j]))
                progress.advance(task, len(jobs[j][2]))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _close_zips()
    return torch.from_numpy(flat).view(len(listing.names), listing.per_class, image_size, image_size)


# ----------------------------------------------------------------------------- cache
def _root_writable(root: Path) -> bool:
    """Writable by its permission bits, not just by os.access (which says yes to root for r-x dirs)."""
    try:
        mode = root.stat().st_mode
    except OSError:
        return False
    return os.access(root, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def cache_path(root: Path, image_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the decoded tensor is cached (see the module docstring for the rules)."""
    base = f"omniglot_{image_size}"
    if cache_dir not in (None, ""):
        folder = Path(os.path.expanduser(os.fspath(cache_dir)))
    elif os.environ.get("FEWSHOT_CACHE"):
        folder = Path(os.path.expanduser(os.environ["FEWSHOT_CACHE"]))
    elif _root_writable(root):
        return root / ".fewshot_cache" / f"{base}.pt"
    else:
        folder = Path.home() / ".cache" / "fewshot"
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return folder / f"{base}_{tag}.pt"


def _cache_key(listing: _Listing, image_size: int) -> dict:
    return {"format": "fewshot_runner.omniglot", "version": CACHE_VERSION, "image_size": image_size,
            "file_count": listing.file_count, "per_class": listing.per_class}


def load_cache(path: Path, listing: _Listing, image_size: int) -> "torch.Tensor | None":
    """The cached images if ``path`` holds a valid, current cache; None otherwise (warns if corrupt)."""
    import torch

    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != "fewshot_runner.omniglot":
            raise ValueError("not an Omniglot cache")
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        warnings.warn(f"Omniglot cache {path} is corrupt ({type(e).__name__}: {_one_line(e)[:200]}); rebuilding it",
                      stacklevel=3)
        return None
    if any(obj.get(k) != v for k, v in _cache_key(listing, image_size).items()) or obj.get("names") != listing.names:
        return None  # stale: other data or other settings
    images = obj.get("images")
    want = (len(listing.names), listing.per_class, image_size, image_size)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != want:
        warnings.warn(f"Omniglot cache {path} is corrupt (bad images tensor); rebuilding it", stacklevel=3)
        return None
    return images


def save_cache(path: Path, listing: _Listing, image_size: int, images: "torch.Tensor") -> bool:
    """Write the cache atomically (temp file + os.replace); warn and go on if that fails."""
    import torch

    obj = {**_cache_key(listing, image_size), "names": list(listing.names), "images": images.contiguous()}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
        return True
    except (OSError, RuntimeError) as e:
        warnings.warn(f"could not write the Omniglot cache {path} ({_one_line(e)}); set $FEWSHOT_CACHE to a writable "
                      f"folder to load faster next time", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False


# ----------------------------------------------------------------------------- splits
def build_splits(images: "torch.Tensor", char_names: list[str], split_names: dict[str, list[str]],
                 rotations: bool = True, where: str = "the data") -> dict[str, "ClassSplit"]:
    """ClassSplits of (character, rotation) classes from (n_chars, per, H, W) uint8 images."""
    import torch

    from fewshot_runner.data.base import ClassSplit

    index = {name: i for i, name in enumerate(char_names)}

    def class_images(split: str, names: list[str]) -> torch.Tensor:
        chars = [n.rsplit("/", 1)[0] for n in names]
        missing = [c for c in chars if c not in index]
        if missing:
            raise DataError(f"the {split} split names {missing[0]} ({len(set(missing))} characters in all) but {where} has no "
                            f"such character: the data is incomplete, download it again")
        idx = torch.tensor([index[c] for c in chars], dtype=torch.long)
        rot = torch.tensor([int(n[-3:]) // 90 for n in names], dtype=torch.long)
        out = torch.empty((len(names), images.shape[1], 1, *images.shape[2:]), dtype=torch.uint8)
        for k in range(4):
            sel = (rot == k).nonzero().squeeze(1)
            if sel.numel():
                out[sel, :, 0] = torch.rot90(images[idx[sel]], k, dims=(-2, -1))
        return out

    names = {s: [n for n in v if rotations or n.endswith("/rot000")] for s, v in split_names.items()}
    splits: dict[str, ClassSplit] = {}
    if "trainval" in names and names["trainval"] == names.get("train", []) + names.get("val", []):
        # train and val are views into trainval: no second copy of 4,800 classes
        tv = class_images("trainval", names["trainval"])
        n_train = len(names["train"])
        splits["train"] = ClassSplit.from_class_major("train", tv[:n_train], names["train"])
        splits["val"] = ClassSplit.from_class_major("val", tv[n_train:], names["val"])
        splits["trainval"] = ClassSplit.from_class_major("trainval", tv, names["trainval"])
    for split, cls_names in names.items():
        if split not in splits:
            splits[split] = ClassSplit.from_class_major(split, class_images(split, cls_names), cls_names)
    return {s: splits[s] for s in SPLIT_NAMES if s in splits}


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
             rotations: bool = True, *, split_dir: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None, workers: int | None = None) -> "EpisodicDataset":
    """Omniglot as an EpisodicDataset named "omniglot" with splits train, val, test, trainval.

    root: folder holding the data (layouts in the module docstring); None: ``$FEWSHOT_DATA/omniglot``,
        else ``~/.cache/fewshot/omniglot``.
    download: fetch the missing image sets with torchvision (needs internet).
    image_size: side of the square images; each split holds uint8 images (n, 1, image_size, image_size).
    split_scheme: "vinyals" (the split files shipped in the package: Vinyals et al. 2016, whole alphabets
        held out, as the ProtoNet and Matching Networks papers) or "maml" (the MAML paper's protocol:
        a seeded random split of all characters, 1,100 / 100 / 423, see ``random_character_split``).
    rotations: (character, rotation) classes as in the split files; False keeps rot000 classes only.
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
    return EpisodicDataset("omniglot", splits)
