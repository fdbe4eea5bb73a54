"""CUB-200-2011 (Wah et al. 2011): 11,788 photographs of 200 bird species, with the class split of
Chen et al. (2019, "A Closer Look at Few-shot Classification"): the 200 class folders sorted by name,
index i (from 0) to train when i % 2 == 0 (100 classes), to val when i % 4 == 1 (50), to test when
i % 4 == 3 (50), as their ``filelists/CUB/write_CUB_filelist.py`` does. The lists ship as
``splits/cub/{train,val,test}.txt`` (the same lists as torchmeta's CUB assets); checksum ``SPLIT_CHECKSUM``.
Used for cross-domain evaluation (a model trained on miniImageNet tested on CUB classes) or trained on.

Layout read (under ``$FEWSHOT_DATA/cub`` by default; first match): ``CUB_200_2011/images/<class>/*.jpg``
(the official archive CUB_200_2011.tgz extracted), or ``images/<class>/*.jpg``, or the archive
``CUB_200_2011.tgz`` itself, read in place (its ``CUB_200_2011/images/<class>/<image>`` members, the same
files in the same order as the extracted folder's; nothing extracted). Images are decoded once (RGB, some
are grey; resized to ``image_size`` x ``image_size`` with PIL's bilinear filter, no crop) into an image
store read lazily.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_runner.data.archive import tar_file_members
from fewshot_runner.data.decode import decode_tar_into
from fewshot_runner.data.image_folder import EXTENSIONS, folder_layout
from fewshot_runner.data.published import (Expect, Inspection, Layout, MissingData, decoder, fingerprint,
                                           inspect_published)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from fewshot_runner.data.base import EpisodicDataset

NAME = "cub"
WHAT = "CUB-200-2011"
SPLIT_CHECKSUM = "7046166cae5d4602"
EXPECT = Expect(totals={"all": 11788})
GET = ("get CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/) and put it in {root} as it is "
       "(it is read in place), or extract it there so that {root}/CUB_200_2011/images/<class>/*.jpg exist")
TGZ = "CUB_200_2011.tgz"
TGZ_IMAGES = ("CUB_200_2011/images/", "images/")  # where the class folders are in the archive (first match)


def listed_images(root: Path, tgz: Path, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The members of ``tgz`` under ``TGZ_IMAGES`` folders, in archive order: one pass through the archive (about
    10 s of CPU for the 1.1 GB CUB_200_2011.tgz), remembered in ``cub_tgz_listing.json`` beside the image store
    (``cache.cache_path`` rules), keyed by the archive's path, size and time, so a later start skips the pass."""
    import json

    from fewshot_runner.data.cache import atomic_write, cache_path

    path, key = cache_path(root, "cub_tgz_listing", cache_dir, suffix=".json"), fingerprint([tgz])
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key and all(isinstance(m, str) for m in saved["members"]):
            return list(saved["members"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass  # absent, stale or unreadable: list the archive again
    members = [m for m in tar_file_members(tgz) if m.startswith(TGZ_IMAGES)]
    try:
        atomic_write(path, lambda f: f.write(json.dumps({"key": key, "members": members}).encode("utf-8")))
    except OSError:
        pass  # only a speed-up
    return members


def tgz_layout(root: Path, tgz: Path, image_size: int, get: str, cache_dir: str | os.PathLike | None = None) -> Layout:
    """The Layout of the class folders inside ``tgz`` (one pass to list it, or its remembered listing; the images
    are decoded in one more pass when the store is built): classes and files sorted by name, as the extracted
    folder's."""
    members = listed_images(root, tgz, cache_dir)
    for prefix in TGZ_IMAGES:
        files: dict[str, list[str]] = {}
        for m in members:
            parts = m[len(prefix):].split("/") if m.startswith(prefix) else []
            if len(parts) == 2 and not parts[0].startswith(".") and not parts[1].startswith(".") \
                    and parts[1].lower().endswith(EXTENSIONS):
                files.setdefault(parts[0], []).append(m)
        if files:
            break
    else:
        raise MissingData(f"{tgz} holds no {TGZ_IMAGES[0]}<class>/<image> files ({', '.join(EXTENSIONS)}): it is not "
                          f"CUB-200-2011's archive; {get}", [str(tgz)], [f"{tgz}:{TGZ_IMAGES[0]}<class>/<image>"], get)
    files = {c: sorted(files[c]) for c in sorted(files)}
    n = sum(map(len, files.values()))

    def fill(out: "np.ndarray", classes: list[str]) -> None:
        rows = {m: i for i, m in enumerate(m for c in classes for m in files[c])}
        decode_tar_into(out, tgz, rows, decoder(image_size, 3), WHAT,
                        f"{WHAT}: decoding {len(rows)} images to {image_size}x{image_size} from {tgz.name}")

    key = {"layout": "class folders in CUB_200_2011.tgz", "files": fingerprint([tgz]), "n_files": n,
           "image_size": image_size, "channels": 3}
    found = [f"{tgz} (read in place: {len(files)} class folders, {n} images)"]
    return Layout(NAME, WHAT, root, f"{TGZ}, read in place", found, {c: len(v) for c, v in files.items()},
                  (3, image_size, image_size), key, fill, get)


def find_layout(root: Path, image_size: int = 84, cache_dir: str | os.PathLike | None = None) -> Layout:
    get = GET.format(root=root)
    if root.exists() and not root.is_dir():
        raise MissingData(f"{WHAT} root {root} is a file, not a folder: set data.root to the folder holding "
                          f"CUB_200_2011 or {TGZ}", [], [str(root)], get)
    for images in (root / "CUB_200_2011" / "images", root / "images"):
        if images.is_dir():
            return folder_layout(NAME, WHAT, root, images, image_size, 3, get, "CUB_200_2011/images class folders")
    tgz = root / TGZ
    if tgz.is_file():
        return tgz_layout(root, tgz, image_size, get, cache_dir)
    what = "" if root.is_dir() else " (the folder does not exist)"
    raise MissingData(f"no {WHAT} images under {root}{what}: {get}", [],
                      [str(root / "CUB_200_2011" / "images") + "/<class>/*.jpg", f"or {tgz}"], get)


def inspect(root: str | None = None, image_size: int = 84, *, split_dir: str | os.PathLike | None = None,
            expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> Inspection:
    """What ``CUB`` would read, found and listed (nothing decoded)."""
    return inspect_published(NAME, WHAT, functools.partial(find_layout, cache_dir=cache_dir), SPLIT_CHECKSUM, EXPECT,
                             root, image_size, split_dir, expect, cache_dir)


def CUB(root: str | None = None, image_size: int = 84, *, split_dir: str | os.PathLike | None = None,
        expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> "EpisodicDataset":
    """CUB-200-2011 as an EpisodicDataset "cub": train (100 classes), val (50), test (50), trainval; uint8
    images (n, 3, image_size, image_size), 41 to 60 per class, read lazily from the image store.

    root: the folder holding CUB_200_2011 or CUB_200_2011.tgz (module docstring); None: ``$FEWSHOT_DATA/cub``.
    split_dir, expect, cache_dir: as ``miniimagenet.MiniImageNet``.
    """
    return inspect(root, image_size, split_dir=split_dir, expect=expect, cache_dir=cache_dir).dataset()


CUB.inspect = inspect  # what `fewshot data check` calls (data/check.py)
