"""Tiny copies of the published data sets in their exact on-disk formats, written by the tests.

Every image is one solid colour that encodes (class, item): ``colour(k, i)``, so a test can tell from
the pixels which class and which item an image is, even after JPEG (solid colours survive it within a
few levels). Class names come from the shipped split lists; ``write_split_dir`` writes the test-only
split files that make a tiny copy pass the split check (``split_dir=``), as ``data.split_dir`` does.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_runner.data.published import load_split


def colour(k: int, i: int) -> tuple[int, int, int]:
    """The RGB colour of item ``i`` of class number ``k`` (k < 20, i < 10): distinct, JPEG-safe (steps of 12)."""
    return (12 * k + 4, 12 * i + 4, 200 - 6 * k)


def solid(k: int, i: int, h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3) of ``colour(k, i)``."""
    return np.broadcast_to(np.array(colour(k, i), dtype=np.uint8), (h, w, 3)).copy()


def tiny_names(dataset: str, per_split: int = 2) -> dict[str, list[str]]:
    """The first ``per_split`` classes of each split of the shipped split ``dataset``."""
    names = load_split(dataset, dataset)
    return {s: v[:per_split] for s, v in names.items()}


def write_split_dir(folder: Path, names: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s, v in names.items():
        (folder / f"{s}.txt").write_text("".join(f"{c}\n" for c in v))
    return folder


def class_order(names: dict[str, list[str]]) -> list[str]:
    return [c for s in ("train", "val", "test") for c in names[s]]


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


# ----------------------------------------------------------------------------- miniImageNet
def write_mini_pickles(root: Path, names: dict[str, list[str]], per_class: int = 3, size: int = 84) -> Path:
    """``mini-imagenet-cache-{split}.pkl``: {"image_data": uint8 (n, size, size, 3), "class_dict": wnid -> rows}."""
    root.mkdir(parents=True, exist_ok=True)
    order = class_order(names)
    for s in ("train", "val", "test"):
        images, class_dict = [], {}
        for wnid in names[s]:
            k = order.index(wnid)
            class_dict[wnid] = list(range(len(images), len(images) + per_class))
            images += [solid(k, i, size, size) for i in range(per_class)]
        with open(root / f"mini-imagenet-cache-{s}.pkl", "wb") as f:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, f, protocol=4)
    return root


def write_mini_folder(root: Path, names: dict[str, list[str]], per_class: int = 3, size: int = 84) -> Path:
    """Ravi & Larochelle's layout: ``images/<wnid><8 digits>.jpg`` and ``{split}.csv`` (filename,label)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    order = class_order(names)
    for s in ("train", "val", "test"):
        rows = ["filename,label"]
        for wnid in names[s]:
            k = order.index(wnid)
            for i in range(per_class):
                fname = f"{wnid}{i + 1:08d}.jpg"
                (root / "images" / fname).write_bytes(encode(solid(k, i, size, size), "JPEG"))
                rows.append(f"{fname},{wnid}")
        (root / f"{s}.csv").write_text("\n".join(rows) + "\n")
    return root


# ----------------------------------------------------------------------------- tieredImageNet
def tiered_arrays(names: dict[str, list[str]], per_class: int = 3, size: int = 84):
    """Per split: (images uint8 (n, size, size, 3), label_specific (n,), label_specific_str); items interleaved
    across classes (class 0 item 0, class 1 item 0, ...) as real copies are not sorted by class."""
    order = class_order(names)
    out = {}
    for s in ("train", "val", "test"):
        imgs, labels = [], []
        for i in range(per_class):
            for j, wnid in enumerate(names[s]):
                imgs.append(solid(order.index(wnid), i, size, size))
                labels.append(j)
        out[s] = (np.stack(imgs), np.array(labels, dtype=np.int64), list(names[s]))
    return out


def write_tiered(root: Path, names: dict[str, list[str]], per_class: int = 3, size: int = 84,
                 png: bool = False) -> Path:
    """``{split}_labels.pkl`` + ``{split}_images.npz`` (np.savez, key images), or ``{split}_images_png.pkl``
    (a list of PNG-encoded arrays as OpenCV's imencode writes them: the array's channels reversed in the PNG)."""
    root.mkdir(parents=True, exist_ok=True)
    for s, (images, labels, strs) in tiered_arrays(names, per_class, size).items():
        with open(root / f"{s}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": labels, "label_general": np.zeros_like(labels),
                         "label_specific_str": strs, "label_general_str": ["n00000000"]}, f, protocol=2)
        if png:
            items = [np.frombuffer(encode(np.ascontiguousarray(im[..., ::-1]), "PNG"), dtype=np.uint8) for im in images]
            with open(root / f"{s}_images_png.pkl", "wb") as f:
                pickle.dump(items, f, protocol=4)
        else:
            np.savez(root / f"{s}_images.npz", images=images)
    return root


# ----------------------------------------------------------------------------- CIFAR-100
def write_cifar(root: Path, fine: list[str], coarse_of: dict[str, str], train_per: int = 3, test_per: int = 1,
                bytes_keys: bool = True) -> Path:
    """torchvision's ``cifar-100-python/{train,test,meta}``: Python-2-style pickles (bytes keys) of
    ``data`` uint8 (n, 3072) (R plane, G plane, B plane), ``fine_labels``, ``coarse_labels``; and ``meta``."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    coarse = sorted(set(coarse_of.values()))
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    for part, n, first in (("train", train_per, 0), ("test", test_per, train_per)):
        data, fl, cl = [], [], []
        for i in range(first, first + n):
            for k, name in enumerate(fine):
                data.append(cifar_image(k, i).transpose(2, 0, 1).reshape(-1))
                fl.append(k)
                cl.append(coarse.index(coarse_of[name]))
        obj = {key("data"): np.stack(data), key("fine_labels"): fl, key("coarse_labels"): cl,
               key("batch_label"): b"training batch 1 of 1", key("filenames"): [b"x.png"] * len(fl)}
        with open(base / part, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with open(base / "meta", "wb") as f:
        pickle.dump({key("fine_label_names"): fine, key("coarse_label_names"): coarse}, f, protocol=2)
    return root


def cifar_image(k: int, i: int) -> np.ndarray:
    """uint8 (32, 32, 3): ``colour(k, i)`` with one marked pixel (row 1, column 2) = (255, 0, 1), to check the
    row-major R, G, B plane layout."""
    im = solid(k, i, 32, 32)
    im[1, 2] = (255, 0, 1)
    return im


# ----------------------------------------------------------------------------- class folders (CUB, image_folder)
def write_class_folders(base: Path, classes: list[str], per_class: int = 3, size=(50, 40), fmt: str = "JPEG",
                        ext: str = ".jpg", mode: str = "RGB") -> Path:
    """``base/<class>/<class>_<i><ext>`` images of ``colour(k, i)``, size (w, h), saved in ``mode``."""
    for k, c in enumerate(classes):
        (base / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.fromarray(solid(k, i, size[1], size[0]))
            if mode != "RGB":
                im = im.convert(mode)
            buf = io.BytesIO()
            im.save(buf, format=fmt)
            (base / c / f"{c.split('.')[-1]}_{i:04d}{ext}").write_bytes(buf.getvalue())
    return base


# ----------------------------------------------------------------------------- for config tests
def config_overrides(name: str, folder: Path) -> list[str]:
    """Write a tiny copy for ``data=<name>`` (a published data set or image_folder) under ``folder`` and return
    the overrides that read it: ``data.root``, a test-only ``data.split_dir``, and 2-way episodes."""
    if name == "image_folder":
        write_class_folders(folder / "root", [f"c{k}" for k in range(10)], per_class=2, size=(12, 10))
        return [f"data.root={folder / 'root'}", "data.n_way=2"]
    names = tiny_names(name, 2 if name != "fc100" else 1)
    writers = {"miniimagenet": lambda r: write_mini_pickles(r, names, size=12),
               "tieredimagenet": lambda r: write_tiered(r, names, size=12),
               "cub": lambda r: write_class_folders(r / "CUB_200_2011" / "images", class_order(names), size=(12, 10))}
    if name in ("cifar_fs", "fc100"):
        fs = tiny_names("cifar_fs", 2)
        fine = class_order(fs)
        supers = class_order(tiny_names("fc100", 1))
        write_cifar(folder / "root", fine, {c: supers[i % 3] for i, c in enumerate(fine)})
    else:
        writers[name](folder / "root")
    split = write_split_dir(folder / "split", fs if name == "cifar_fs" else names)
    return [f"data.root={folder / 'root'}", f"data.split_dir={split}", "data.n_way=2"]


# ----------------------------------------------------------------------------- the published archives, as downloaded
def tar_tree(archive: Path, base: Path, arcname: str, mode: str = "w:gz", shuffle_seed: int | None = None,
             extra: dict[str, bytes] | None = None) -> Path:
    """The folder ``base`` written into the tar ``archive`` as ``arcname/...`` (folders, then files; in sorted order,
    or shuffled by ``shuffle_seed``: real archives need not list members by name), plus ``extra`` members
    (name -> bytes) at the top of the archive."""
    import random
    import tarfile

    paths = sorted(base.rglob("*"))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(paths)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode) as tf:
        tf.add(base, arcname=arcname, recursive=False)
        for p in sorted(paths, key=lambda q: not q.is_dir()):  # (a folder before its files; stable: keeps the shuffle)
            tf.add(p, arcname=f"{arcname}/{p.relative_to(base).as_posix()}", recursive=False)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return archive


def write_cifar_tar(root: Path, fine: list[str], coarse_of: dict[str, str], train_per: int = 3,
                    test_per: int = 1) -> Path:
    """torchvision's download as it is: ``root/cifar-100-python.tar.gz`` holding ``cifar-100-python/{train,test,meta}``
    (``write_cifar``'s files, bytes keys) and ``file.txt~`` as the real archive does; nothing else under ``root``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = write_cifar(Path(tmp), fine, coarse_of, train_per, test_per) / "cifar-100-python"
        (base / "file.txt~").write_bytes(b"")
        return tar_tree(root / "cifar-100-python.tar.gz", base, "cifar-100-python")


def write_cub_tgz(root: Path, classes: list[str], per_class: int = 3, size=(50, 40), grey: int = 0,
                  shuffle_seed: int | None = 0) -> Path:
    """The official ``root/CUB_200_2011.tgz`` in miniature: ``CUB_200_2011/images/<class>/*.jpg`` (``write_class_folders``;
    the last ``grey`` classes saved grey as some CUB photographs are), ``classes.txt``, ``images.txt``, and the
    top-level ``attributes.txt`` beside the folder; members shuffled by ``shuffle_seed``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "CUB_200_2011"
        write_cub_folder(base, classes, per_class, size, grey)
        return tar_tree(root / "CUB_200_2011.tgz", base, "CUB_200_2011", shuffle_seed=shuffle_seed,
                        extra={"attributes.txt": b"1 has_bill_shape::curved_(up_or_down)\n"})


def write_cub_folder(base: Path, classes: list[str], per_class: int = 3, size=(50, 40), grey: int = 0) -> Path:
    """The extracted ``CUB_200_2011`` folder at ``base``: images (as ``write_cub_tgz``), ``classes.txt``, ``images.txt``."""
    split = len(classes) - grey
    write_class_folders(base / "images", classes[:split], per_class, size)
    if grey:
        write_class_folders(base / "images", classes[split:], per_class, size, mode="L")
    (base / "classes.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(classes)))
    files = sorted(p.relative_to(base / "images").as_posix() for p in (base / "images").rglob("*.jpg"))
    (base / "images.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(files)))
    return base


def write_mini_tar(root: Path, names: dict[str, list[str]], per_class: int = 3, size: int = 84,
                   archive: str = "mini-imagenet.tar.gz", folder: str = "") -> Path:
    """torchmeta's ``mini-imagenet.tar.gz`` (renmengye/few-shot-ssl-public's file): ``write_mini_pickles``'s three
    pickles at the archive's top (or in ``folder``); nothing else under ``root``."""
    import tarfile
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_mini_pickles(Path(tmp), names, per_class, size)
        with tarfile.open(root / archive, "w:gz") as tf:
            for s in ("train", "val", "test"):
                name = f"mini-imagenet-cache-{s}.pkl"
                tf.add(Path(tmp) / name, arcname=f"{folder}/{name}" if folder else name)
    return root / archive
