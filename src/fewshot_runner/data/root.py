"""Where a data set's files are: root resolution, shared by every data set.

A data set named ``name`` is read from the first of: the ``root`` argument (``data.root``, ``~``
expanded), ``$FEWSHOT_DATA/<name>``, ``~/.cache/fewshot/<name>``.

No torch here: importing a data module stays cheap.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space: for error messages."""
    return " ".join(str(text).split())


def resolve_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """``root`` (``~`` expanded), else ``$FEWSHOT_DATA/<name>``, else ``~/.cache/fewshot/<name>``; absolute."""
    if root not in (None, ""):
        return Path(os.path.expanduser(os.fspath(root))).absolute()
    env = os.environ.get("FEWSHOT_DATA")
    if env:
        return (Path(os.path.expanduser(env)) / name).absolute()
    return Path.home() / ".cache" / "fewshot" / name


def root_writable(root: Path) -> bool:
    """Writable by its permission bits, not just by os.access (which says yes to root for r-x dirs)."""
    try:
        mode = root.stat().st_mode
    except OSError:
        return False
    return os.access(root, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
