"""Decoding many image files into one uint8 array, in forked processes, with a progress bar.

Generic over the per-file decode function: ``decode(data: bytes) -> np.ndarray`` of a fixed
shape, a module-level function or a ``functools.partial`` of one (it is sent to the workers).
Each file is decoded independently into its own row, so the result does not depend on the
number of workers or the chunking.

Fork, not spawn: spawned workers re-run an unguarded ``__main__`` script (a plain script building
a data set at top level would decode it once per worker); the forked workers only run zipfile /
PIL / numpy code, never torch, CUDA or the caller's threads. The pool is started before the
progress bar's thread. Where no pool can be had, or it breaks, the rest is decoded in this
process, with a warning.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from fewshot_runner.data.archive import Source, close_zips, iter_tar_members, read_member
from fewshot_runner.data.root import one_line
from fewshot_runner.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

CHUNK = 400  # files per decoding job
POOL_MIN_FILES = 2000  # below this a process pool costs more than it saves

Decode = Callable[[bytes], "np.ndarray"]


def default_workers() -> int:
    """The CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _decode_job(job: tuple[Source, list[str], Decode, tuple[int, ...]]) -> tuple["np.ndarray | None", str | None]:
    """Decode one chunk of members; returns (images, None) or (None, one-line error naming the member)."""
    import numpy as np

    source, members, decode, item_shape = job
    out = np.empty((len(members), *item_shape), dtype=np.uint8)
    for i, member in enumerate(members):
        try:
            out[i] = decode(read_member(source, member))
        except Exception as e:  # noqa: BLE001 - reported to the parent as a DataError
            return None, f"{source.where(member)} ({type(e).__name__}: {one_line(e)})"
    return out, None


def _start_pool(jobs: list, workers: int, what: str):
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
        warnings.warn(f"{what}: no process pool ({type(e).__name__}: {one_line(e)}); decoding in this process",
                      stacklevel=5)
        return None, None


def make_jobs(files: Sequence[tuple[Source, str]], chunk: int) -> tuple[list[list[str]], list[Source], list[int]]:
    """Cut ``files`` into runs of at most ``chunk`` members of one source: (members, source, first row) per job."""
    members: list[list[str]] = []
    sources: list[Source] = []
    offsets: list[int] = []
    for row, (source, member) in enumerate(files):
        if not sources or sources[-1] != source or len(members[-1]) >= chunk:
            members.append([])
            sources.append(source)
            offsets.append(row)
        members[-1].append(member)
    return members, sources, offsets


def decode_files(files: Sequence[tuple[Source, str]], decode: Decode, item_shape: tuple[int, ...], *,
                 what: str, description: str | None = None, workers: int | None = None, out: "np.ndarray | None" = None,
                 chunk: int = CHUNK, pool_min: int = POOL_MIN_FILES) -> "np.ndarray":
    """Decode every ``(source, member)`` of ``files`` into row i of a uint8 (len(files), *item_shape) array.

    what: the data set's name in messages ("Omniglot": "cannot decode Omniglot image <where> ...").
    description: the progress bar's text (default "<what>: decoding <n> images"); the bar is drawn on
        stderr from 1,000 files on.
    workers: decoding processes (default: the usable CPUs, at most 8); 1 decodes here.
    out: a writable uint8 array of that shape to fill (e.g. a ``numpy.memmap`` of a store being
        written, for data that does not fit in memory); default a new array.
    chunk, pool_min: files per job, and the fewest files worth a pool.

    A file that does not decode stops it all with a one-line DataError naming that file.
    """
    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    n = len(files)
    shape = (n, *item_shape)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {shape}, got {out.dtype} {out.shape}")
    members, sources, offsets = make_jobs(files, max(1, int(chunk)))
    jobs = [(src, ms, decode, tuple(item_shape)) for src, ms in zip(sources, members)]
    todo = set(range(len(jobs)))
    workers = default_workers() if workers is None else max(1, int(workers))

    def store(j: int, result: tuple) -> None:
        images, err = result
        if err is not None:
            raise DataError(f"cannot decode {what} image {err}: the data is corrupt, download it again")
        out[offsets[j]: offsets[j] + len(images)] = images
        todo.discard(j)

    close_zips()  # no open zip (and its file offset) may be shared with forked workers
    pool, futures = None, None
    if workers > 1 and n >= pool_min and len(jobs) > 1 and sys.platform.startswith("linux"):
        pool, futures = _start_pool(jobs, min(workers, len(jobs)), what)  # before the progress bar's thread starts
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), transient=False, disable=n < 1000) as progress:
            task = progress.add_task(description or f"{what}: decoding {n} images", total=n)
            if futures is not None:
                from concurrent.futures import as_completed
                from concurrent.futures.process import BrokenProcessPool

                try:
                    for fut in as_completed(futures):
                        j = futures[fut]
                        store(j, fut.result())
                        progress.advance(task, len(jobs[j][1]))
                except (BrokenProcessPool, OSError, EOFError) as e:
                    warnings.warn(f"{what}: parallel decoding failed ({type(e).__name__}: {one_line(e)}); "
                                  f"decoding the rest in this process", stacklevel=3)
            for j in sorted(todo):
                store(j, _decode_job(jobs[j]))
                progress.advance(task, len(jobs[j][1]))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        close_zips()
    return out


# ----------------------------------------------------------------------------- one image file, as a data set stores it
@dataclass(frozen=True)
class ImageSpec:
    """How a data set turns an image file into its stored uint8 (channels, height, width) array, so training
    data and ``fewshot predict``'s images (any size, any PIL mode) are converted by the same code.

    Steps: transparency flattened onto white (only for images that have it); ``convert("L")`` (channels 1) or
    ``convert("RGB")`` (3); PIL ``resize((width, height), BILINEAR)`` where the size differs (antialiased when
    it shrinks, as torchvision's ``Resize``); ``255 - x`` with ``invert`` (Omniglot: strokes bright on 0).
    """

    channels: int
    height: int
    width: int
    invert: bool = False

    @property
    def x_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def convert(self, im) -> "np.ndarray":
        """A PIL image -> uint8 (channels, height, width)."""
        import numpy as np
        from PIL import Image

        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("L" if self.channels == 1 else "RGB")
        if im.size != (self.width, self.height):
            im = im.resize((self.width, self.height), Image.Resampling.BILINEAR)
        x = np.asarray(im, dtype=np.uint8)
        if self.invert:
            x = 255 - x
        return x[None] if self.channels == 1 else np.ascontiguousarray(x.transpose(2, 0, 1))

    def decode(self, data: bytes) -> "np.ndarray":
        """Encoded image bytes (PNG, JPEG, ...) -> uint8 (channels, height, width)."""
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return self.convert(im)


def image_spec(data_cfg) -> ImageSpec:
    """The :class:`ImageSpec` of a data config (a checkpoint's ``data`` node): the data set factory's own
    ``image_spec(**keys)`` where it declares one (``Omniglot.image_spec``: gray, inverted), else its
    ``image_size`` and ``channels`` keys (no inversion).  A data set that says neither is a one-line UserError."""
    import importlib

    from fewshot_runner.errors import UserError

    keys = {k: v for k, v in dict(data_cfg).items() if k != "_target_"}
    target = str(data_cfg.get("_target_", ""))
    module, _, name = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"data._target_={target} cannot be imported, so its images cannot be converted: "
                        f"use the fewshot version that wrote the checkpoint") from None
    declared = getattr(factory, "image_spec", None)  # the data set's declared conversion (see the docstring)
    if declared is not None:
        return declared(**keys)
    size, channels = keys.get("image_size"), keys.get("channels")
    if isinstance(size, int) and isinstance(channels, int) and channels in (1, 3):
        return ImageSpec(channels, size, size)
    raise UserError(f"data set {name} does not say how it converts image files (no image_size and channels of "
                    f"1 or 3, no image_spec): fewshot predict cannot read images for it")


# ----------------------------------------------------------------------------- members of a tar, in one pass
@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (from 1,000 items on); yields ``advance(n)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False, disable=total < 1000) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _decode_chunk(job: tuple[Callable[[bytes], "np.ndarray"], tuple[int, ...], list[tuple[int, str, bytes]]]):
    """Decode one chunk of (row, member, bytes): (rows, images, None) or (None, None, one-line error)."""
    import numpy as np

    decode, item_shape, items = job
    out = np.empty((len(items), *item_shape), dtype=np.uint8)
    for i, (_, member, data) in enumerate(items):
        try:
            out[i] = decode(data)
        except Exception as e:  # noqa: BLE001 - reported to the parent as a DataError
            return None, None, f"{member} ({type(e).__name__}: {one_line(e)})"
    return [row for row, _, _ in items], out, None


def decode_tar_into(out: "np.ndarray", path: str | os.PathLike, rows: dict[str, int],
                    decode: Callable[[bytes], "np.ndarray"], what: str, description: str, *,
                    workers: int | None = None, chunk: int = 100, pool_min: int | None = None) -> None:
    """Decode the tar members ``rows`` names into those rows of ``out`` (uint8 (n, *item_shape)), in one
    pass through the archive, with a progress bar: ``out[rows[m]] = decode(bytes of m)``.

    The bytes are read here, in archive order, and decoded in chunks by a forked process pool (as
    ``data.decode.decode_files``: from ``pool_min`` (default ``POOL_MIN_FILES``) members on, Linux, 2+ CPUs;
    otherwise, or when
    the pool breaks, here), at most two chunks per worker in flight, so memory stays bounded. Each image
    is decoded by itself, so the result is the same for any number of workers. A member that does not
    decode, or one ``rows`` names that the archive lacks, is a one-line DataError.
    """
    import multiprocessing
    import sys
    import warnings
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    path = os.fspath(path)
    workers = default_workers() if workers is None else max(1, int(workers))
    pool = None
    pool_min = POOL_MIN_FILES if pool_min is None else pool_min
    if workers > 1 and len(rows) >= pool_min and sys.platform.startswith("linux"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # (forking a threaded process: see decode.py)
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
                pool.submit(int).result()  # forks every worker now, before the progress bar's thread starts
        except (OSError, ValueError, RuntimeError, BrokenProcessPool) as e:
            warnings.warn(f"{what}: no process pool ({type(e).__name__}: {one_line(e)}); decoding in this process",
                          stacklevel=2)
            pool = None
    pending: dict = {}
    found = 0

    def put(result, advance) -> None:
        got, images, err = result
        if err is not None:
            raise DataError(f"cannot decode {what} image {path}:{err}: the data is corrupt, download it again")
        out[got] = images
        advance(len(got))

    def collect(advance) -> None:
        """Store the results of the pending chunks that are done (at least one)."""
        nonlocal pool
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in done:
            job = pending.pop(fut)
            try:
                result = fut.result()
            except (BrokenProcessPool, OSError, EOFError) as e:
                if pool is not None:
                    warnings.warn(f"{what}: parallel decoding failed ({type(e).__name__}: {one_line(e)}); "
                                  f"decoding the rest in this process", stacklevel=4)
                    pool = None
                result = _decode_chunk(job)
            put(result, advance)

    try:
        with progress(len(rows), description) as advance:
            def submit(batch: list[tuple[int, str, bytes]]) -> None:
                job = (decode, tuple(out.shape[1:]), batch)
                if pool is None:
                    put(_decode_chunk(job), advance)
                    return
                pending[pool.submit(_decode_chunk, job)] = job
                while len(pending) >= 2 * workers:
                    collect(advance)

            batch: list[tuple[int, str, bytes]] = []
            for name, data in iter_tar_members(path, rows):
                if data is not None:
                    found += 1
                    batch.append((rows[name], name, data))
                    if len(batch) >= chunk:
                        submit(batch)
                        batch = []
            if batch:
                submit(batch)
            while pending:
                collect(advance)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if found != len(rows):
        raise DataError(f"{path} changed while it was read ({len(rows) - found} of {len(rows)} listed images are no "
                        f"longer in it): run again")
