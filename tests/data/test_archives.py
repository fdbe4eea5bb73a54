"""The published archives read in place, as downloaded: CIFAR-100's ``cifar-100-python.tar.gz`` (CIFAR-FS, FC100),
``CUB_200_2011.tgz`` and miniImageNet's ``mini-imagenet.tar.gz`` (the pickles), tiny copies written here in the exact archive forms (tests/tiny_copies.py). Each loads
equal to its extracted folder; an archive with an unsafe member, a truncated or a corrupt one is one line (and a
non-zero exit through `fewshot data check`), and nothing is ever written outside the cache folder."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import one_error_line, run_cli
from PIL import Image
from tiny_copies import (tiny_names, write_cifar, write_cifar_tar, write_cub_folder, write_cub_tgz, write_mini_pickles,
                         write_mini_tar, write_split_dir)

from fewshot_runner.data import archive
from fewshot_runner.data.cifar import CIFAR_FS, FC100
from fewshot_runner.data.cub import CUB
from fewshot_runner.data.cub import inspect as inspect_cub
from fewshot_runner.data.decode import decode_tar_into
from fewshot_runner.data.miniimagenet import MiniImageNet
from fewshot_runner.data.published import decoder, split_checksum
from fewshot_runner.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

FS = tiny_names("cifar_fs", 2)
FINE = [c for s in ("train", "val", "test") for c in FS[s]]
FC = tiny_names("fc100", 1)
SUPER = [FC["train"][0], FC["val"][0], FC["test"][0]]
COARSE_OF = {c: SUPER[i % 3] for i, c in enumerate(FINE)}
CUB_NAMES = tiny_names("cub", 2)
CUB_ORDER = [c for s in ("train", "val", "test") for c in CUB_NAMES[s]]


def _tree(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _same_splits(a, b) -> None:
    """Two EpisodicDatasets hold the same classes, counts and images in every split, and the same split checksum."""
    assert a.x_shape == b.x_shape and a.split_checksum == b.split_checksum
    for s in ("train", "val", "test", "trainval"):
        x, y = a.split(s), b.split(s)
        assert x.class_names == y.class_names and torch.equal(x.counts, y.counts) and torch.equal(x.labels, y.labels)
        n = x.images.shape[0]
        assert torch.equal(x.images[torch.arange(n)], y.images[torch.arange(n)])


def _add_member(src, dst, info: tarfile.TarInfo, data: bytes = b"") -> None:
    """A copy of the tar ``src`` at ``dst`` with one more member (a crafted one) after the others."""
    with tarfile.open(src) as old, tarfile.open(dst, "w:gz") as new:
        for m in old:
            new.addfile(m, old.extractfile(m) if m.isreg() else None)
        info.size = len(data) if info.isreg() else 0
        new.addfile(info, io.BytesIO(data) if info.isreg() else None)


# ----------------------------------------------------------------------------- equal to the extracted form
def test_cifar_tar_gz_reads_in_place_equal_to_the_extracted_files(tmp_path):
    folder = write_cifar(tmp_path / "folder", FINE, COARSE_OF)
    tar_root = tmp_path / "tar"
    write_cifar_tar(tar_root, FINE, COARSE_OF)
    fs_split, fc_split = write_split_dir(tmp_path / "s_fs", FS), write_split_dir(tmp_path / "s_fc", FC)
    for factory, split in ((CIFAR_FS, fs_split), (FC100, fc_split)):
        want = factory(str(folder), split_dir=split, cache_dir=tmp_path / "c_folder")
        got = factory(str(tar_root), split_dir=split, cache_dir=tmp_path / "c_tar")
        _same_splits(got, want)
    assert got.split("test").images.shape == (8, 3, 32, 32)  # 2 classes x (3 train + 1 test images)
    assert _tree(tar_root) == ["cifar-100-python.tar.gz"]  # nothing extracted, nothing written beside it
    info = CIFAR_FS.inspect(str(tar_root), split_dir=fs_split, cache_dir=tmp_path / "c_tar")
    assert info.layout.form == "cifar-100-python.tar.gz, read in place"
    assert info.layout.found == [f"{tar_root / 'cifar-100-python.tar.gz'} (read in place: cifar-100-python/train, "
                                 f"cifar-100-python/test, cifar-100-python/meta)"]


def test_cub_tgz_builds_the_same_store_as_the_extracted_folder(tmp_path):
    write_cub_folder(tmp_path / "folder" / "CUB_200_2011", CUB_ORDER, grey=2)
    tgz_root = tmp_path / "tgz"
    write_cub_tgz(tgz_root, CUB_ORDER, grey=2, shuffle_seed=3)  # members in no particular order
    split = write_split_dir(tmp_path / "s", CUB_NAMES)
    want = CUB(str(tmp_path / "folder"), split_dir=split, cache_dir=tmp_path / "c_folder")
    got = CUB(str(tgz_root), split_dir=split, cache_dir=tmp_path / "c_tgz")
    _same_splits(got, want)
    assert got.split_checksum == split_checksum(CUB_NAMES)
    assert got.x_shape == (3, 84, 84) and got.split("train").counts.tolist() == [3, 3]
    assert _tree(tgz_root) == ["CUB_200_2011.tgz"]
    written = _tree(tmp_path / "c_tgz")  # the only files written: the store and the archive's listing, in the cache dir
    assert len(written) == 2 and written[0].startswith("cub_3x84x84_") and written[0].endswith(".store")
    assert written[1].startswith("cub_tgz_listing_") and written[1].endswith(".json")
    found = inspect_cub(str(tgz_root), split_dir=split, cache_dir=tmp_path / "c_tgz")
    assert found.layout.form == "CUB_200_2011.tgz, read in place"
    assert found.layout.found == [f"{tgz_root / 'CUB_200_2011.tgz'} (read in place: 6 class folders, 18 images)"]
    assert found.store_path.is_file()
    # the extracted folder wins where both are there (the archive is not listed)
    (tmp_path / "folder" / "CUB_200_2011.tgz").symlink_to(tgz_root / "CUB_200_2011.tgz")
    assert inspect_cub(str(tmp_path / "folder"), split_dir=split).layout.form == "CUB_200_2011/images class folders"


@pytest.mark.parametrize("archive, folder", [("mini-imagenet.tar.gz", ""), ("miniImageNet.tar.gz", "miniImageNet")])
def test_mini_imagenet_tar_gz_reads_the_pickles_in_place_equal_to_the_pickles(tmp_path, archive, folder):
    names = tiny_names("miniimagenet", 2)
    split = write_split_dir(tmp_path / "s", names)
    write_mini_pickles(tmp_path / "pickles", names, size=12)
    path = write_mini_tar(tmp_path / "tar", names, size=12, archive=archive, folder=folder)
    want = MiniImageNet(str(tmp_path / "pickles"), image_size=12, split_dir=split, cache_dir=tmp_path / "c1")
    got = MiniImageNet(str(tmp_path / "tar"), image_size=12, split_dir=split, cache_dir=tmp_path / "c2")
    _same_splits(got, want)
    assert got.split("val").counts.tolist() == [3, 3] and _tree(tmp_path / "tar") == [archive]
    info = MiniImageNet.inspect(str(tmp_path / "tar"), image_size=12, split_dir=split)
    prefix = f"{folder}/" if folder else ""
    assert info.layout.form == f"{archive}, read in place"
    assert info.layout.found == [f"{path} (read in place: " + ", ".join(
        f"{prefix}mini-imagenet-cache-{s}.pkl" for s in ("train", "val", "test")) + ")"]


def test_the_tgz_listing_is_remembered_until_the_archive_changes(tmp_path, monkeypatch):
    from fewshot_runner.data import cub

    tgz = write_cub_tgz(tmp_path / "cub", CUB_ORDER, per_class=1, size=(8, 8))
    passes = []
    monkeypatch.setattr(cub, "tar_file_members", lambda p: passes.append(p) or archive.tar_file_members(p))
    first = cub.listed_images(tmp_path / "cub", tgz, tmp_path / "c")
    assert cub.listed_images(tmp_path / "cub", tgz, tmp_path / "c") == first and len(passes) == 1
    assert sorted(first) == sorted(f"CUB_200_2011/images/{c}/{c.split('.')[-1]}_0000.jpg" for c in CUB_ORDER)
    write_cub_tgz(tmp_path / "cub", CUB_ORDER[:3], per_class=1, size=(8, 8))  # replaced: listed again
    assert len(cub.listed_images(tmp_path / "cub", tgz, tmp_path / "c")) == 3 and len(passes) == 2


def test_tar_decoding_in_a_process_pool_equals_decoding_here_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(11, 6, 6, 3), dtype=np.uint8)
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tf:
        for i in (7, 2, 9, 0, 4, 10, 1, 3, 8, 5, 6):  # archive order differs from row order
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            info = tarfile.TarInfo(f"./im/{i}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    rows = {f"im/{i}.png": i for i in range(11)}
    want = images.transpose(0, 3, 1, 2)  # PNG is lossless: decoding gives back the pixels, channels first
    for workers in (1, 2):
        out = np.zeros((11, 3, 6, 6), dtype=np.uint8)
        decode_tar_into(out, path, rows, decoder(6, 3), "test", "decoding", workers=workers, chunk=3,
                                pool_min=1)
        assert np.array_equal(out, want), workers


# ----------------------------------------------------------------------------- what is refused, in one line
def _evil(kind: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo({"dotdot": "../evil", "absolute": "/tmp/evil", "symlink": "CUB_200_2011/images/x/e.jpg",
                            "hardlink": "CUB_200_2011/images/x/h.jpg", "fifo": "CUB_200_2011/fifo"}[kind])
    info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}.get(kind,
                                                                                                        tarfile.REGTYPE)
    info.linkname = {"symlink": "/etc/passwd", "hardlink": "CUB_200_2011/classes.txt"}.get(kind, "")
    return info


@pytest.mark.parametrize("kind, message", [
    ("dotdot", r"holds an unsafe member name '\.\./evil' \(absolute or with '\.\.'\); refusing the archive"),
    ("absolute", r"holds an unsafe member name '/tmp/evil'"),
    ("symlink", r"holds a link member 'CUB_200_2011/images/x/e.jpg' \(-> '/etc/passwd'\); refusing the archive"),
    ("hardlink", r"holds a link member 'CUB_200_2011/images/x/h.jpg'"),
    ("fifo", r"holds a special file member 'CUB_200_2011/fifo' \(a device or pipe\)"),
])
def test_an_archive_with_an_unsafe_member_is_refused_whole(tmp_path, kind, message):
    good = write_cub_tgz(tmp_path / "good", CUB_ORDER[:2], per_class=1, size=(8, 8))
    root = tmp_path / "cub"
    root.mkdir()
    _add_member(good, root / "CUB_200_2011.tgz", _evil(kind), b"PWNED")
    split = write_split_dir(tmp_path / "s", CUB_NAMES)
    with pytest.raises(DataError, match=message) as e:
        CUB(str(root), split_dir=split, cache_dir=tmp_path / "c")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "evil").exists() and _tree(root) == ["CUB_200_2011.tgz"]
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_truncated_corrupt_or_foreign_archives_are_one_line_each(tmp_path):
    good = write_cub_tgz(tmp_path / "good", CUB_ORDER, per_class=2, size=(8, 8)).read_bytes()
    split = write_split_dir(tmp_path / "s", CUB_NAMES)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    cases = {"truncated": (good[: len(good) // 2], r"is not a readable tar archive or is truncated \(EOFError"),
             "corrupt": (bytes(flipped), r"is not a readable tar archive or is truncated \((BadGzipFile|ReadError|"
                                         r"error)"),
             "not a tar": (b"x", r"is not a readable tar archive or is truncated \(ReadError")}
    for name, (data, message) in cases.items():
        root = tmp_path / name.replace(" ", "_")
        root.mkdir()
        (root / "CUB_200_2011.tgz").write_bytes(data)
        with pytest.raises(DataError, match=message + r".*: delete it and download it again$") as e:
            CUB(str(root), split_dir=split, cache_dir=tmp_path / "c")
        assert "\n" not in str(e.value), name
    # a well-formed archive with one image that is not an image: that member named, at decoding
    root = tmp_path / "bad_image"
    root.mkdir()
    bad = tarfile.TarInfo(f"CUB_200_2011/images/{CUB_ORDER[0]}/zz_broken.jpg")
    _add_member(tmp_path / "good" / "CUB_200_2011.tgz", root / "CUB_200_2011.tgz", bad, b"not a jpeg")
    with pytest.raises(DataError, match=rf"cannot decode CUB-200-2011 image .*CUB_200_2011.tgz:{bad.name} "
                                        rf"\(UnidentifiedImageError: .*\): the data is corrupt, download it again$"):
        CUB(str(root), split_dir=split, cache_dir=tmp_path / "c_bad")
    assert [p.name for p in (tmp_path / "c_bad").iterdir() if p.suffix != ".json"] == []  # no torn store left
    # a plain tar cut exactly between two members (no end-of-archive marker) is caught too
    with tarfile.open(tmp_path / "good" / "CUB_200_2011.tgz") as tf:
        plain = io.BytesIO()
        with tarfile.open(fileobj=plain, mode="w") as out:
            members = tf.getmembers()
            for m in members:
                out.addfile(m, tf.extractfile(m) if m.isreg() else None)
            cut = members[-1].offset  # where the last member's header starts
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "CUB_200_2011.tgz").write_bytes(plain.getvalue()[:cut])
    with pytest.raises(DataError, match=r"no end-of-archive marker"):
        CUB(str(tmp_path / "cut"), split_dir=split, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_an_archive_without_the_data_says_so(tmp_path):
    (tmp_path / "cub").mkdir()
    with tarfile.open(tmp_path / "cub" / "CUB_200_2011.tgz", "w:gz") as tf:
        info = tarfile.TarInfo("CUB_200_2011/README")
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match=r"CUB_200_2011.tgz holds no CUB_200_2011/images/<class>/<image> files .*: it "
                                        r"is not CUB-200-2011's archive; get CUB_200_2011.tgz"):
        CUB(str(tmp_path / "cub"))
    write_cifar_tar(tmp_path / "cifar", FINE, COARSE_OF)
    with tarfile.open(tmp_path / "cifar" / "cifar-100-python.tar.gz") as tf:
        kept = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf if not m.name.endswith("meta")]
    with tarfile.open(tmp_path / "cifar" / "cifar-100-python.tar.gz", "w:gz") as tf:
        for m, data in kept:
            tf.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(DataError, match=r"cifar-100-python.tar.gz holds no member cifar-100-python/meta: it is not "
                                        r"CIFAR-100's python version"):
        FC100(str(tmp_path / "cifar"))
    with tarfile.open(tmp_path / "mini-imagenet.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("mini-imagenet-cache-train.pkl")
        tf.addfile(info, io.BytesIO(b""))
    (tmp_path / "mini").mkdir()
    (tmp_path / "mini-imagenet.tar.gz").rename(tmp_path / "mini" / "mini-imagenet.tar.gz")
    with pytest.raises(DataError, match=r"mini-imagenet.tar.gz:mini-imagenet-cache-train.pkl is not a miniImageNet "
                                        r"cache .*: replace mini-imagenet.tar.gz with the archive"):
        MiniImageNet(str(tmp_path / "mini"))
    pickles = write_mini_pickles(tmp_path / "p", tiny_names("miniimagenet", 1), per_class=1, size=4)
    with tarfile.open(tmp_path / "mini" / "mini-imagenet.tar.gz", "w:gz") as tf:
        tf.add(pickles / "mini-imagenet-cache-train.pkl", arcname="mini-imagenet-cache-train.pkl")
    with pytest.raises(DataError, match=r"mini-imagenet.tar.gz holds no member mini-imagenet-cache-val.pkl \(at its "
                                        r"top or one folder down\): it is not the archive of the miniImageNet pickles"):
        MiniImageNet(str(tmp_path / "mini"))


# ----------------------------------------------------------------------------- through the CLI
def test_data_check_reports_the_cifar_archive_usable(tmp_path):
    root = tmp_path / "cifar"
    write_cifar_tar(root, FINE, COARSE_OF)
    p = run_cli(["data", "check", "data=cifar_fs", f"data.root={root}",
                 f"data.split_dir={write_split_dir(tmp_path / 's', FS)}"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"CIFAR-FS: found under {root} (cifar-100-python.tar.gz, read in place):" in p.stdout
    assert "usable: yes" in p.stdout and "extract" not in p.stdout
    assert _tree(root) == ["cifar-100-python.tar.gz"]


def test_data_prepare_builds_the_cub_store_from_the_tgz_in_the_cache_dir_only(tmp_path):
    root = tmp_path / "cub"
    write_cub_tgz(root, CUB_ORDER, per_class=2, size=(16, 12))
    args = [f"data.root={root}", f"data.split_dir={write_split_dir(tmp_path / 's', CUB_NAMES)}", "data.image_size=8"]
    env = {"FEWSHOT_CACHE": str(tmp_path / "cache")}
    p = run_cli(["data", "prepare", "data=cub", *args], tmp_path, env_extra=env)
    assert p.returncode == 0, p.stderr
    assert "images (3, 8, 8)" in p.stdout and f"split checksum {split_checksum(CUB_NAMES)}" in p.stdout
    written = _tree(tmp_path / "cache")
    assert len(written) == 2 and written[0].startswith("cub_3x8x8_") and written[0].endswith(".store")
    assert written[1].startswith("cub_tgz_listing_") and written[1].endswith(".json")
    assert _tree(root) == ["CUB_200_2011.tgz"]


@pytest.mark.parametrize("bad", ["dotdot", "truncated"])
def test_data_check_of_a_bad_archive_is_one_line_and_non_zero(tmp_path, bad):
    root = tmp_path / "cub"
    root.mkdir()
    good = write_cub_tgz(tmp_path / "good", CUB_ORDER[:2], per_class=1, size=(8, 8))
    if bad == "dotdot":
        _add_member(good, root / "CUB_200_2011.tgz", _evil("dotdot"), b"PWNED")
        fragments = ("CUB_200_2011.tgz holds an unsafe member name '../evil'",)
    else:
        (root / "CUB_200_2011.tgz").write_bytes(good.read_bytes()[:-40])
        fragments = ("CUB_200_2011.tgz is not a readable tar archive or is truncated", "download it again")
    p = run_cli(["data", "check", "data=cub", f"data.root={root}"], tmp_path)
    one_error_line(p, *fragments)
    assert p.returncode == 2 and not (tmp_path / "evil").exists() and _tree(root) == ["CUB_200_2011.tgz"]
