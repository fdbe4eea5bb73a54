"""Schemas of the data group (``data=NAME``): the episode shape every data set shares, and each data set's own keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from fewshot_runner.schemas import register


@dataclass
class NormalizeConfig:
    mean: list[float] = field(default_factory=list)  # one per channel
    std: list[float] = field(default_factory=list)


@dataclass
class AugmentConfig:
    """Training-only augmentation (never at validation, test or `fewshot eval`)."""

    crop_padding: int = 0  # random crop of the image size after zero padding by this many pixels (0: off)
    flip: bool = False  # random horizontal flip
    color_jitter: float = 0.0  # brightness / contrast / saturation jitter strength (0: off)
    # (each part with probability 1/2: rotation +-10 deg, shear +-0.3, scale 0.8-1.2, translation +-2 px)
    affine: bool = False  # Koch et al. (2015)'s random affine distortions (algo=siamese sets it)


@dataclass
class DataConfig:
    """Episode shape plus the data set's own keys. ``n_way/n_shot/n_query`` shape the
    validation and test episodes and, unless ``train_*`` says otherwise, training ones."""

    _target_: str = MISSING
    n_way: int = 5  # classes per validation/test episode (and training, unless train_n_way)
    n_shot: int = 1  # labelled support images per class
    n_query: int = 15  # query images per class, to classify
    train_n_way: Optional[int] = None  # e.g. 60 for ProtoNet's higher-way training
    train_n_shot: Optional[int] = None  # null: n_shot
    train_n_query: Optional[int] = None  # null: n_query (MAML on Omniglot: 1, as the paper's code)
    # the data layer's transform hook (data/transforms.py), on the device after uint8 -> float:
    # per-channel normalisation (data.normalize.mean=[...] data.normalize.std=[...]; empty: none) and
    # training-only augmentation
    normalize: NormalizeConfig = field(default_factory=lambda: NormalizeConfig())  # empty mean/std: none
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig())
    # DataLoader worker processes that gather training batches ahead (0: none); the batches are the same,
    # for data read lazily from disk (data/store.py, data/loader.py)
    workers: int = 0


@register("data", "omniglot")
@dataclass
class OmniglotConfig(DataConfig):
    _target_: str = "fewshot_runner.data.omniglot.Omniglot"
    root: Optional[str] = None  # None: $FEWSHOT_DATA/omniglot, else ~/.cache/fewshot/omniglot
    download: bool = False  # true: fetch with torchvision when the data is missing (needs internet)
    image_size: int = 28  # pixels per side, after resizing from 105
    # vinyals: the Vinyals et al. split (whole alphabets held out; ProtoNet, Matching Nets); maml: the
    # MAML paper's random split of all characters (1,100 / 100 / 423; test alphabets seen in training); lake:
    # Lake et al. / Koch et al., the background set (964 characters: 732 train, 6 alphabets' 232 val) for
    # training, the evaluation set (20 alphabets, 659 characters) for the test, no rotations
    split_scheme: str = "vinyals"
    # validation and test episodes take all their classes from one alphabet (Lake's and Koch's harder
    # 20-way within-alphabet test); training episodes still draw from every training class
    within_alphabet: bool = False


@register("data", "synthetic")
@dataclass
class SyntheticConfig(DataConfig):
    _target_: str = "fewshot_runner.data.synthetic.Synthetic"
    n_classes_train: int = 64  # generated classes per split
    n_classes_val: int = 16
    n_classes_test: int = 20
    per_class: int = 20  # images per class
    image_size: int = 28  # pixels per side
    channels: int = 1  # image channels
    seed: int = 0  # the classes depend on this seed only
