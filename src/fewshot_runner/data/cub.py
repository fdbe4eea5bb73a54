"""CUB-200-2011 (Wah et al. 2011): 11,788 photographs of 200 bird species, with the class split of
Chen et al. (2019, "A Closer Look at Few-shot Classification"): the 200 class folders sorted by name,
index i (from 0) to train when i % 2 == 0 (100 classes), to val when i % 4 == 1 (50), to test when
i % 4 == 3 (50), as their ``filelists/CUB/write_CUB_filelist.py`` does. The lists ship as
``splits/cub/{train,val,test}.txt`` (the same lists as torchmeta's CUB assets); checksum ``SPLIT_CHECKSUM``.
Used for cross-domain evaluation (a model trained on miniImageNet tested on CUB classes) or trained on.

Layout read (under ``$FEWSHOT_DATA/cub`` by default; first match): ``CUB_200_2011/images/<class>/*.jpg``
(the official archive CUB_200_2011.tgz extracted), or ``images/<class>/*.jpg``. Images are decoded once
(RGB, some are grey; resized to ``image_size`` x ``image_size`` with PIL's bilinear filter, no crop) into
an image store read lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_runner.data.image_folder import folder_layout
from fewshot_runner.data.published import Expect, Inspection, Layout, MissingData, inspect_published

if TYPE_CHECKING:  # pragma: no cover
    from fewshot_runner.data.base import EpisodicDataset

NAME = "cub"
WHAT = "CUB-200-2011"
SPLIT_CHECKSUM = "7046166cae5d4602"
EXPECT = Expect(totals={"all": 11788})
GET = ("get CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/) and extract it in {root}, "
       "so that {root}/CUB_200_2011/images/<class>/*.jpg exist")


def find_layout(root: Path, image_size: int = 84) -> Layout:
    get = GET.format(root=root)
    if root.exists() and not root.is_dir():
        raise MissingData(f"{WHAT} root {root} is a file, not a folder: set data.root to the folder holding "
                          f"CUB_200_2011", [], [str(root)], get)
    for images in (root / "CUB_200_2011" / "images", root / "images"):
        if images.is_dir():
            return folder_layout(NAME, WHAT, root, images, image_size, 3, get, "CUB_200_2011/images class folders")
    tgz = root / "CUB_200_2011.tgz"
    hint = f"extract {tgz} there (tar xzf {tgz.name})" if tgz.is_file() else get
    what = "" if root.is_dir() else " (the folder does not exist)"
    raise MissingData(f"no {WHAT} images under {root}{what}: {hint}", [str(tgz)] if tgz.is_file() else [],
                      [str(root / "CUB_200_2011" / "images") + "/<class>/*.jpg"], hint)


def inspect(root: str | None = None, image_size: int = 84, *, split_dir: str | os.PathLike | None = None,
            expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> Inspection:
    """What ``CUB`` would read, found and listed (nothing decoded)."""
    return inspect_published(NAME, WHAT, find_layout, SPLIT_CHECKSUM, EXPECT, root, image_size, split_dir, expect,
                             cache_dir)


def CUB(root: str | None = None, image_size: int = 84, *, split_dir: str | os.PathLike | None = None,
        expect: Expect | None = None, cache_dir: str | os.PathLike | None = None) -> "EpisodicDataset":
    """CUB-200-2011 as an EpisodicDataset "cub": train (100 classes), val (50), test (50), trainval; uint8
    images (n, 3, image_size, image_size), 41 to 60 per class, read lazily from the image store.

    root: the folder holding CUB_200_2011 (module docstring); None: ``$FEWSHOT_DATA/cub``.
    split_dir, expect, cache_dir: as ``miniimagenet.MiniImageNet``.
    """
    return inspect(root, image_size, split_dir=split_dir, expect=expect, cache_dir=cache_dir).dataset()


CUB.inspect = inspect  # what `fewshot data check` calls (data/check.py)
