"""Images that need not fit in memory: a class-indexed store in one file, read lazily.

A store file holds the uint8 images of a data set, class by class (class-major: all items of
class 0, then class 1, ...), written once and then read through ``numpy.memmap``: only the pages
an episode touches are read, and the OS page cache keeps the hot ones. tieredImageNet at 84x84
(~16 GB) or a user's large image folder work with the same ``ClassSplit``, ``EpisodeSampler``
and ``Episode`` as Omniglot in memory: ``DiskImages`` stands in for the ``images`` tensor of a
``ClassSplit`` (``split.images[items]`` with a LongTensor of any shape gives a uint8 tensor).

File layout: ``MAGIC`` (16 bytes), the header length (8 bytes, little-endian), a UTF-8 JSON
header (format, version, the caller's ``key``, item shape, class names, items per class), zero
padding to a multiple of 4096, then the raw images, C-contiguous. It is written to a temporary
file beside the target and renamed over it when complete, so a killed writer leaves no torn store.

    store = open_class_store(path, key)             # None: absent or stale (or corrupt: warned)
    if store is None:
        store = write_class_store(path, key, class_names, counts, (3, 84, 84),
                                  fill=lambda out: decode_files(files, decode, (3, 84, 84), what="X", out=out))
    train = store.split("train", train_class_names)  # a ClassSplit reading from the file

DataLoader workers: a ``DiskImages`` pickles as its path and shape (never its pages) and opens
its own memmap in each process.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fewshot_runner.data.base import ClassSplit
from fewshot_runner.data.cache import atomic_write
from fewshot_runner.data.root import one_line
from fewshot_runner.errors import DataError

MAGIC = b"FEWSHOT-STORE-1\n"
FORMAT = "fewshot_runner.class_store"
VERSION = 1
_ALIGN = 4096


class DiskImages:
    """uint8 images (n_items, *item_shape) in a file at byte ``offset``, read through ``numpy.memmap``.

    ``self[idx]``: ``idx`` a LongTensor or integer array of any shape -> a uint8 tensor
    (*idx.shape, *item_shape), a fresh copy; an int -> one item; a slice -> those items.
    ``rows`` (optional) maps this view's item i to row ``rows[i]`` of the file, so one file serves
    splits over any subset of its classes.
    """

    def __init__(self, path: str | os.PathLike, offset: int, n_rows: int, item_shape: Sequence[int],
                 rows: torch.Tensor | None = None) -> None:
        self.path = str(path)
        self.offset = int(offset)
        self.n_rows = int(n_rows)
        self.item_shape = tuple(int(d) for d in item_shape)
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self._mm: np.memmap | None = None
        self._pid = -1

    # the tensor-like surface ClassSplit and the sampler use
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n_rows if self.rows is None else len(self.rows), *self.item_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return 1 + len(self.item_shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _memmap(self) -> np.memmap:
        if self._mm is None or self._pid != os.getpid():  # one map per process (a forked worker makes its own)
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset,
                                 shape=(self.n_rows, *self.item_shape))
            self._pid = os.getpid()
        return self._mm

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        elif isinstance(idx, (int, np.integer)):
            n = len(self)
            if not -n <= int(idx) < n:
                raise IndexError(f"index {int(idx)} is out of range for {n} images")
            idx = torch.tensor(int(idx) % n)
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool or idx.is_floating_point():
            raise TypeError(f"DiskImages takes integer indices, not {idx.dtype}")
        idx = idx.long()
        if self.rows is not None:
            idx = self.rows[idx]
        flat = idx.reshape(-1).numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.n_rows):
            raise IndexError(f"an index is out of range for {self.n_rows} images")
        out = np.asarray(self._memmap()[flat])  # fancy indexing: a copy, only the touched pages read
        return torch.from_numpy(out).view(*idx.shape, *self.item_shape)

    def take(self, items: torch.Tensor) -> "DiskImages":
        """A view of these items (positions in this view), in this order; nothing is read."""
        items = torch.as_tensor(items, dtype=torch.long)
        rows = items if self.rows is None else self.rows[items]
        return DiskImages(self.path, self.offset, self.n_rows, self.item_shape, rows)

    def tensor(self) -> torch.Tensor:
        """Every item, read into memory: uint8 (n, *item_shape)."""
        return self[torch.arange(len(self))]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mm"], state["_pid"] = None, -1  # pickled as where the file is, never its pages
        return state

    def __repr__(self) -> str:
        return f"DiskImages({self.path!r}, shape={tuple(self.shape)})"


class ClassStore:
    """An opened store: its header and the images of all its classes, class-major."""

    def __init__(self, path: Path, header: dict, offset: int) -> None:
        self.path, self.header = path, header
        self.class_names: list[str] = list(header["class_names"])
        self.counts = torch.tensor(header["counts"], dtype=torch.long)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.images = DiskImages(path, offset, int(self.counts.sum()), header["item_shape"])
        self._class_id = {n: i for i, n in enumerate(self.class_names)}

    @property
    def key(self) -> dict:
        return dict(self.header["key"])

    def split(self, name: str, class_names: Sequence[str] | None = None) -> ClassSplit:
        """A ClassSplit ``name`` over these classes of the store (default all), in this order, read lazily."""
        names = self.class_names if class_names is None else list(class_names)
        missing = [c for c in names if c not in self._class_id]
        if missing:
            raise DataError(f"the {name} split names class {missing[0]} ({len(missing)} in all) but the store {self.path} "
                            f"has no such class: delete the store to rebuild it")
        ids = torch.tensor([self._class_id[c] for c in names], dtype=torch.long)
        counts = self.counts[ids]
        rows = torch.cat([torch.arange(int(s), int(s + c)) for s, c in zip(self.starts[ids], counts)]) if len(ids) \
            else torch.zeros(0, dtype=torch.long)
        if len(ids) and torch.equal(rows, torch.arange(self.images.n_rows)):
            images = self.images  # the whole store in its own order: no row table
        else:
            images = self.images.take(rows)
        labels = torch.arange(len(names)).repeat_interleave(counts)
        return ClassSplit(name, images, labels, names)


def _header_bytes(header: dict) -> tuple[bytes, int]:
    body = json.dumps(header, sort_keys=True).encode("utf-8")
    start = len(MAGIC) + 8 + len(body)
    offset = -(-start // _ALIGN) * _ALIGN
    return MAGIC + struct.pack("<Q", len(body)) + body + b"\0" * (offset - start), offset


def write_class_store(path: str | os.PathLike, key: dict, class_names: Sequence[str], counts: Sequence[int],
                      item_shape: Sequence[int], fill: Callable[[np.ndarray], None]) -> ClassStore:
    """Write a store at ``path`` and open it.

    key: plain JSON data saying what the store was built from (data set, version, sizes, file
        names ...); ``open_class_store`` treats a store with another key as stale.
    class_names, counts: the classes in store order and the items of each.
    fill(out): writes every item into ``out``, a writable uint8 memmap (sum(counts), *item_shape),
        class-major; e.g. ``decode_files(..., out=out)``. It may hold far more than memory.
    A failure to write (disk full, read-only folder) is a one-line DataError naming the path.
    """
    path = Path(path)
    class_names, counts = [str(c) for c in class_names], [int(c) for c in counts]
    if len(class_names) != len(counts) or len(set(class_names)) != len(class_names) or min(counts, default=1) < 0:
        raise ValueError("class_names must be distinct, with one count >= 0 each")
    item_shape = [int(d) for d in item_shape]
    n = sum(counts)
    header = {"format": FORMAT, "version": VERSION, "key": key, "item_shape": item_shape, "dtype": "uint8",
              "class_names": class_names, "counts": counts}
    head, offset = _header_bytes(header)
    nbytes = n * int(np.prod(item_shape, dtype=np.int64))

    def write(f) -> None:
        f.write(head)
        f.truncate(offset + nbytes)
        f.flush()
        if n:
            out = np.memmap(f, dtype=np.uint8, mode="r+", offset=offset, shape=(n, *item_shape))
            try:
                fill(out)
                out.flush()
            finally:
                del out

    try:
        atomic_write(path, write)
    except OSError as e:
        raise DataError(f"cannot write the image store {path} ({one_line(e)}): set $FEWSHOT_CACHE to a folder with "
                        f"{nbytes / 1e9:.1f} GB free") from None
    return ClassStore(path, header, offset)


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a fewshot_runner image store")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 1 << 30:
            raise ValueError(f"header length {length}")
        header = json.loads(f.read(length).decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("not a fewshot_runner image store")
    return header, -(-(len(MAGIC) + 8 + length) // _ALIGN) * _ALIGN


def open_class_store(path: str | os.PathLike, key: dict, what: str = "image") -> ClassStore | None:
    """The store at ``path`` if it is complete and was built with ``key``; None if absent or stale.

    A store that cannot be read, or whose size disagrees with its header, is corrupt: warned about
    ("<what> store <path> is corrupt (...); rebuilding it") and None, so the caller rebuilds it.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        header, offset = _read_header(path)
        if header.get("version") != VERSION:
            return None
        counts, shape = header["counts"], header["item_shape"]
        names = header["class_names"]
        if not (isinstance(counts, list) and isinstance(names, list) and len(counts) == len(names)
                and all(isinstance(c, int) and c >= 0 for c in counts) and isinstance(shape, list)
                and all(isinstance(d, int) and d > 0 for d in shape) and header.get("dtype") == "uint8"):
            raise ValueError("bad header")
        want = offset + sum(counts) * int(np.prod(shape, dtype=np.int64))
        size = path.stat().st_size
        if size != want:
            raise ValueError(f"{size} bytes where the header says {want}")
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        warnings.warn(f"{what} store {path} is corrupt ({type(e).__name__}: {one_line(e)[:200]}); rebuilding it",
                      stacklevel=2)
        return None
    if header.get("key") != json.loads(json.dumps(key)):
        return None  # stale: built from other data or with other settings
    return ClassStore(path, header, offset)


def store_split(split: ClassSplit, path: str | os.PathLike, key: dict | None = None) -> ClassSplit:
    """``split`` (in memory) written to a store at ``path`` and read back lazily: the same classes,
    the same images per class in the same order, so a sampler of either draws the same episodes."""
    if split.images.dtype != torch.uint8:
        raise ValueError(f"a store holds uint8 images; split {split.name!r} holds {split.images.dtype}")
    items = [split.index[c, : int(split.counts[c])] for c in range(split.n_classes)]
    order = torch.cat(items) if items else torch.zeros(0, dtype=torch.long)

    def fill(out: np.ndarray) -> None:
        for start in range(0, len(order), 4096):
            chunk = order[start:start + 4096]
            out[start:start + len(chunk)] = split.images[chunk].numpy()

    store = write_class_store(path, key or {"split": split.name}, split.class_names, split.counts.tolist(),
                              split.x_shape, fill)
    return store.split(split.name)
