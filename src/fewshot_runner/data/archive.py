"""Reading a data set's files where they lie: zip members read in place, or a folder tree.

Nothing is ever extracted. A zip whose member names are absolute or climb out with ``..`` is
refused outright (it could only come from a tampered archive); a symlink member is read as its
bytes (the link text), never followed. A ``Source`` is one such place: ``kind`` "zip" (``path``
is the zip file, members are its names) or "dir" (``path`` is a folder, members are paths
relative to it, "/"-separated).

Open zip files are kept in a per-process cache (``read_member``) so a decoding job opens each zip
once; ``close_zips()`` must run before forking workers, so no open zip (and its file offset) is
shared between processes, and again when done.

No torch here.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fewshot_runner.data.root import one_line
from fewshot_runner.errors import DataError


@dataclass(frozen=True)
class Source:
    """A folder or a zip file that holds images, named by ``kind`` ("dir" or "zip") and ``path``."""

    kind: str
    path: str

    def where(self, member: str) -> str:
        """How an error message names one member: ``zip:member`` or the file's path."""
        return f"{self.path}:{member}" if self.kind == "zip" else os.path.join(self.path, member)


def unsafe_member(name: str) -> bool:
    """A zip member name that is absolute (``/x``, ``\\x``, ``C:x``) or climbs out with ``..``."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return any(part == ".." for part in re.split(r"[/\\]", name))


def zip_file_members(path: str | os.PathLike) -> list[str]:
    """The names of the file members (not folders) of the zip at ``path``, in archive order.

    A one-line DataError names the file when it is no readable zip, or when a member name is
    unsafe (then the whole archive is refused).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path} is not a readable zip file ({one_line(e)}): delete it and download it again") from None
    names = []
    for info in infos:
        if unsafe_member(info.filename):
            raise DataError(f"{path} holds an unsafe member name {info.filename!r} (absolute or with '..'); "
                            f"refusing it: replace the zip with the official one")
        if not info.is_dir():
            names.append(info.filename)
    return names


def tree_files(base: str | os.PathLike, depth: int, what: str = "data") -> list[str]:
    """The regular files exactly ``depth`` levels below ``base``, as sorted "/"-separated relative paths.

    ``depth`` 2 is ``<class>/<image>``, 3 is Omniglot's ``<alphabet>/<character>/<image>``. Folders
    are entered as ``Path.is_dir`` sees them (a link to a folder is followed; no deeper than
    ``depth``). An unreadable folder is a one-line DataError naming it ("cannot read the <what>
    folder ...").
    """
    base = Path(base)

    def walk(folder: Path, rel: str, level: int) -> list[str]:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
        if level == depth:
            return [f"{rel}{p.name}" for p in entries if p.is_file()]
        out: list[str] = []
        for p in entries:
            if p.is_dir():
                out += walk(p, f"{rel}{p.name}/", level + 1)
        return out

    try:
        return walk(base, "", 1)
    except OSError as e:
        raise DataError(f"cannot read the {what} folder {base} ({one_line(e)}): check its permissions") from None


# ----------------------------------------------------------------------------- reading members
_OPEN_ZIPS: dict[str, zipfile.ZipFile] = {}


def read_member(source: Source, member: str) -> bytes:
    """The bytes of one member of ``source`` (a zip member read in place, or a file under the folder)."""
    if source.kind == "zip":
        zf = _OPEN_ZIPS.get(source.path)
        if zf is None:
            zf = _OPEN_ZIPS[source.path] = zipfile.ZipFile(source.path)
        return zf.read(member)
    with open(os.path.join(source.path, *member.split("/")), "rb") as f:
        return f.read()


def close_zips() -> None:
    """Close every zip ``read_member`` opened in this process."""
    while _OPEN_ZIPS:
        _OPEN_ZIPS.popitem()[1].close()
