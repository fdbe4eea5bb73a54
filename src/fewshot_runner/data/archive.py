"""Reading a data set's files where they lie: zip or tar members read in place, or a folder tree.

Nothing is ever extracted. A zip whose member names are absolute or climb out with ``..`` is
refused outright (it could only come from a tampered archive); a symlink member is read as its
bytes (the link text), never followed. A tar (``.tar``, ``.tar.gz``/``.tgz``, bz2, xz) is read in one
sequential pass (``iter_tar_members``, ``read_tar_members``, ``decode_tar_into``): one holding an
absolute or ``..`` name, a link, a device or a pipe is refused outright, and a truncated or corrupt
one is a one-line error. A ``Source`` is one such place: ``kind`` "zip" (``path``
is the zip file, members are its names) or "dir" (``path`` is a folder, members are paths
relative to it, "/"-separated).

Open zip files are kept in a per-process cache (``read_member``) so a decoding job opens each zip
once; ``close_zips()`` must run before forking workers, so no open zip (and its file offset) is
shared between processes, and again when done.

No torch here.
"""

from __future__ import annotations

import io
import lzma
import os
import pickle
import re
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Container, Iterator

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


# ----------------------------------------------------------------------------- tar archives
# A tar (gz, bz2, xz or none: whatever ``tarfile`` reads) is read in one sequential pass: a compressed
# tar has no random access, so a member is read when the pass reaches it, never looked up. Every pass
# checks every member header (an unsafe name, a link or a device refuses the whole archive), the
# end-of-archive marker (a tar cut short at a member boundary) and the compressed stream to its end
# (gzip's CRC and length), so a truncated or corrupt download is one line, not a short data set.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError, lzma.LZMAError)


def _tar_name(name: str) -> str:
    """A member name as listed: "./a/b" -> "a/b" (tar writes either)."""
    while name.startswith("./"):
        name = name[2:]
    return name


def _tar_refusal(path: str, info: tarfile.TarInfo) -> str | None:
    """Why the member ``info`` makes the archive unsafe to read, or None."""
    fix = "refusing the archive: replace it with the official one"
    if unsafe_member(info.name):
        return f"{path} holds an unsafe member name {info.name!r} (absolute or with '..'); {fix}"
    if info.issym() or info.islnk():
        return f"{path} holds a link member {info.name!r} (-> {info.linkname!r}); {fix}"
    if not (info.isreg() or info.isdir()):
        return f"{path} holds a special file member {info.name!r} (a device or pipe); {fix}"
    return None


def iter_tar_members(path: str | os.PathLike, wanted: Container[str] = ()) -> Iterator[tuple[str, bytes | None]]:
    """One pass through the tar at ``path``: ``(name, data)`` for every regular file member, in archive
    order; ``data`` is the member's bytes when ``name in wanted``, else None (not read into memory).

    A one-line DataError names the archive when it is no readable tar, is truncated or corrupt, holds an
    unsafe member (absolute, ``..``, a link, a device or pipe) or the same file twice. Nothing is extracted.
    """
    path = os.fspath(path)
    seen: set[str] = set()
    try:
        with tarfile.open(path, "r:*") as tf:
            for info in tf:  # (in order: each header is read where the previous member's data ends)
                why = _tar_refusal(path, info)
                if why is not None:
                    raise DataError(why)
                if info.isdir():
                    continue
                name = _tar_name(info.name)
                if name in seen:
                    raise DataError(f"{path} holds the member {name!r} twice; refusing the archive: replace it with "
                                    f"the official one")
                seen.add(name)
                data = None
                if name in wanted:
                    f = tf.extractfile(info)
                    data = f.read() if f is not None else b""
                yield name, data
            tf.fileobj.seek(tf.offset)
            if tf.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("no end-of-archive marker: it stops between two members")
            while tf.fileobj.read(1 << 20):  # to the end of the compressed stream: its checksum is checked there
                pass
    except _TAR_ERRORS as e:
        if not os.path.isfile(path):
            raise DataError(f"cannot read {path} ({one_line(e)}): check that it is there and readable") from None
        raise DataError(f"{path} is not a readable tar archive or is truncated ({type(e).__name__}: "
                        f"{one_line(e)[:200]}): delete it and download it again") from None


def tar_file_members(path: str | os.PathLike) -> list[str]:
    """The names of the regular file members of the tar at ``path``, in archive order ("./" dropped).

    One pass through the whole archive (a compressed tar is read to its end): the errors of ``iter_tar_members``.
    """
    return [name for name, _ in iter_tar_members(path)]


def read_tar_members(path: str | os.PathLike, names: Container[str]) -> dict[str, bytes]:
    """The bytes of those of ``names`` the tar at ``path`` holds (one pass; absent names are left out)."""
    return {name: data for name, data in iter_tar_members(path, names) if data is not None}


def unpickle_member(data: bytes, where: str, what: str, fix: str):
    """A pickled archive member's bytes rebuilt by :class:`RestrictedUnpickler` (as ``published.load_pickle``) (builtin
    containers, strings, numbers, numpy arrays; Python 2 pickles read as latin-1); anything else is its one-line
    DataError: "<where> is not <what> (<why>): <fix>"."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - a torn or foreign pickle fails in many ways; all one message
        raise DataError(f"{where} is not {what} ({type(e).__name__}: {one_line(e)[:200]}): {fix}") from None


# ----------------------------------------------------------------------------- safe unpickling
_ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
            ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
            ("_codecs", "encode")}  # (_codecs.encode: how a protocol-2 pickle writes bytes)
_BUILTINS = {"set", "frozenset", "bytearray", "complex", "slice", "range"}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds builtin containers, str, bytes, numbers and numpy arrays (and their dtypes); nothing else."""

    def find_class(self, module: str, name: str):
        if module.startswith("numpy.core."):  # numpy 1.x's module names (numpy 2 has them under numpy._core)
            module = "numpy._core." + module[len("numpy.core."):]
        if (module, name) in _ALLOWED or (module in ("builtins", "__builtin__") and name in _BUILTINS):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds a {module}.{name} object, which this layout never has; "
                                     f"refused without running it")
