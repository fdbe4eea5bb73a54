"""Schemas of the published image data sets and the user's image folders (``data=miniimagenet``,
``tieredimagenet``, ``cifar_fs``, ``fc100``, ``cub``, ``image_folder``): each data set's own keys on top of
the episode shape and transform keys every data set shares (``DataConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fewshot_runner.schemas import register
from fewshot_runner.schemas.data import DataConfig


@register("data", "miniimagenet")
@dataclass
class MiniImageNetConfig(DataConfig):
    _target_: str = "fewshot_runner.data.miniimagenet.MiniImageNet"
    root: Optional[str] = None  # null: $FEWSHOT_DATA/miniimagenet; mini-imagenet-cache-*.pkl or images/ + *.csv
    image_size: int = 84  # pixels per side (the published images are 84 x 84)
    split_dir: Optional[str] = None  # a folder with train.txt, val.txt, test.txt to use instead of the shipped split


@register("data", "tieredimagenet")
@dataclass
class TieredImageNetConfig(DataConfig):
    _target_: str = "fewshot_runner.data.tieredimagenet.TieredImageNet"
    root: Optional[str] = None  # null: $FEWSHOT_DATA/tieredimagenet; *_labels.pkl + *_images.npz or *_images_png.pkl
    image_size: int = 84  # pixels per side (the published images are 84 x 84)
    split_dir: Optional[str] = None  # a folder with train.txt, val.txt, test.txt to use instead of the shipped split


@register("data", "cifar_fs")
@dataclass
class CIFARFSConfig(DataConfig):
    _target_: str = "fewshot_runner.data.cifar.CIFAR_FS"
    root: Optional[str] = None  # null: $FEWSHOT_DATA/cifar100 (shared with fc100); holds cifar-100-python/
    image_size: int = 32  # pixels per side (CIFAR's images are 32 x 32)
    split_dir: Optional[str] = None  # a folder with train.txt, val.txt, test.txt to use instead of the shipped split


@register("data", "fc100")
@dataclass
class FC100Config(DataConfig):
    _target_: str = "fewshot_runner.data.cifar.FC100"
    root: Optional[str] = None  # null: $FEWSHOT_DATA/cifar100 (shared with cifar_fs); holds cifar-100-python/
    image_size: int = 32  # pixels per side (CIFAR's images are 32 x 32)
    split_dir: Optional[str] = None  # a folder with train.txt, val.txt, test.txt to use instead of the shipped split


@register("data", "cub")
@dataclass
class CUBConfig(DataConfig):
    _target_: str = "fewshot_runner.data.cub.CUB"
    root: Optional[str] = None  # null: $FEWSHOT_DATA/cub; holds CUB_200_2011/images/<class>/*.jpg
    image_size: int = 84  # pixels per side, each photograph resized (84: as miniImageNet, for cross-domain tests)
    split_dir: Optional[str] = None  # a folder with train.txt, val.txt, test.txt to use instead of the shipped split


@register("data", "image_folder")
@dataclass
class ImageFolderConfig(DataConfig):
    _target_: str = "fewshot_runner.data.image_folder.ImageFolder"
    root: Optional[str] = None  # your root/<class>/*.{png,jpg,jpeg,bmp,webp}; null: $FEWSHOT_DATA/image_folder
    image_size: int = 84  # every image resized to this many pixels per side (no crop)
    channels: int = 3  # 3: RGB, 1: grey (any image mode is converted)
    split_dir: Optional[str] = None  # a folder with train.txt, val.txt, test.txt (class names); null: split_ratios
    split_ratios: list[float] = field(default_factory=lambda: [0.64, 0.16, 0.20])  # train, val, test class fractions
    split_seed: int = 0  # shuffles the classes before split_ratios cuts them
