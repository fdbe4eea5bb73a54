"""The decoded-tensor cache: decode a data set once, load it in a second next time.

A cache file is one ``torch.save`` dict of tensors, strings and ints (loaded with
``weights_only=True``, so a tampered file cannot run code), written atomically. Its ``key`` (a
plain dict: format name, version, sizes, file names, ...) says what data and settings it was
built from: a file whose key differs is stale and rebuilt silently, one that cannot be read (or
whose tensors have the wrong dtype or shape) is rebuilt with a warning.

Where it lives (``cache_path``), first match: the ``cache_dir`` argument, ``$FEWSHOT_CACHE``,
``<root>/.fewshot_cache`` when the root is writable, ``~/.cache/fewshot``. Outside the root the
file name carries a hash of the root path, so two roots never share a file.

This module imports torch only inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

from fewshot_runner.data.root import one_line, root_writable

if TYPE_CHECKING:  # pragma: no cover
    import torch


def cache_path(root: Path, base: str, cache_dir: str | os.PathLike | None = None, suffix: str = ".pt") -> Path:
    """Where the cache named ``base`` (e.g. "omniglot_28") of the data under ``root`` goes.

    ``<cache_dir or $FEWSHOT_CACHE>/<base>_<hash of root><suffix>``, else ``<root>/.fewshot_cache/<base><suffix>``
    when ``root`` is writable, else ``~/.cache/fewshot/<base>_<hash of root><suffix>``.
    """
    if cache_dir not in (None, ""):
        folder = Path(os.path.expanduser(os.fspath(cache_dir)))
    elif os.environ.get("FEWSHOT_CACHE"):
        folder = Path(os.path.expanduser(os.environ["FEWSHOT_CACHE"]))
    elif root_writable(root):
        return root / ".fewshot_cache" / f"{base}{suffix}"
    else:
        folder = Path.home() / ".cache" / "fewshot"
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return folder / f"{base}_{tag}{suffix}"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], mode: int = 0o644) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, fsync it, then rename it
    over ``path``: readers see the old file or the whole new one, never a torn one. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_cache(path: Path, key: dict, what: str,
               tensors: dict[str, tuple["torch.dtype", tuple[int, ...]]]) -> dict | None:
    """The cached dict if ``path`` holds a valid cache with this ``key``; None otherwise.

    key: must hold "format"; every item is compared with the file's (a difference: stale, None).
    what: the data set's name in the warning ("<what> cache <path> is corrupt (...); rebuilding it").
    tensors: name -> (dtype, shape) the file's tensors must have, else it is corrupt.
    """
    import torch

    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != key["format"]:
            raise ValueError(f"not an {what} cache" if what[:1].lower() in "aeiou" else f"not a {what} cache")
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        warnings.warn(f"{what} cache {path} is corrupt ({type(e).__name__}: {one_line(e)[:200]}); rebuilding it",
                      stacklevel=3)
        return None
    if any(obj.get(k) != v for k, v in key.items()):
        return None  # stale: other data or other settings
    for name, (dtype, shape) in tensors.items():
        t = obj.get(name)
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            warnings.warn(f"{what} cache {path} is corrupt (bad {name} tensor); rebuilding it", stacklevel=3)
            return None
    return obj


def save_cache(path: Path, obj: dict, what: str) -> bool:
    """``torch.save(obj)`` to ``path`` atomically; on failure warn (naming $FEWSHOT_CACHE) and return False."""
    import torch

    try:
        atomic_write(path, lambda f: torch.save(obj, f))
        return True
    except (OSError, RuntimeError) as e:
        warnings.warn(f"could not write the {what} cache {path} ({one_line(e)}); set $FEWSHOT_CACHE to a writable "
                      f"folder to load faster next time", stacklevel=3)
        return False
