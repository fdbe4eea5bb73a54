"""Class-indexed splits: what every episodic data set provides to the samplers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fewshot_runner.data.checksum import split_checksum
from fewshot_runner.data.sampler import EpisodeSampler, check_episode_shape
from fewshot_runner.errors import DataError


@dataclass
class ClassSplit:
    """One split (train/val/test) of a classification data set.

    images: uint8 (or float) tensor (n_items, C, H, W) in memory, or anything indexable like one:
        ``images[LongTensor of any shape]`` -> a tensor (*shape, C, H, W), and ``.shape`` (the lazy
        on-disk ``data.store.DiskImages`` for data that does not fit in memory)
    labels: long tensor (n_items,), class ids 0..n_classes-1
    class_names: one name per class id (for messages and predictions)
    class_groups: None, or a long tensor (n_classes,) of group ids (Omniglot: the alphabet of each class):
        then every episode drawn from the split takes all its classes from one group
        (``data.within_alphabet=true``; data/sampler.py)

    ``index`` is a padded (n_classes, max_per_class) table of item indices (-1 pads) and
    ``counts`` the number of items per class, built once so sampling is pure indexing.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    class_groups: torch.Tensor | None = None

    #: what its episodes ask of a learner: class labels to predict (regression data sets say "regression")
    task_kind: ClassVar[str] = "classification"

    def __post_init__(self) -> None:
        n_classes = len(self.class_names)
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(f"split {self.name!r}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        counts = torch.bincount(self.labels, minlength=n_classes)
        order = torch.argsort(self.labels, stable=True)
        max_per = int(counts.max()) if n_classes else 0
        index = torch.full((n_classes, max_per), -1, dtype=torch.long)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(order.numel()) - starts[self.labels[order]]
        index[self.labels[order], pos] = order
        self.counts = counts
        self.index = index
        if self.class_groups is not None and tuple(self.class_groups.shape) != (n_classes,):
            raise DataError(f"split {self.name!r}: {tuple(self.class_groups.shape)} class groups for {n_classes} classes")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def min_per_class(self) -> int:
        return int(self.counts.min()) if self.n_classes else 0

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @classmethod
    def from_class_major(cls, name: str, images: torch.Tensor, class_names: list[str]) -> "ClassSplit":
        """Build from a (n_classes, per_class, C, H, W) tensor."""
        n_classes, per = images.shape[:2]
        labels = torch.arange(n_classes).repeat_interleave(per)
        return cls(name, images.reshape(n_classes * per, *images.shape[2:]), labels, class_names)

    # The two split-level methods the engine asks any split (a regression data set's split has its own:
    # data/sinusoid.py), so it never tests what kind of split it holds.
    def check_episode_shape(self, n_way: int, n_shot: int, n_query: int) -> None:
        """A one-line DataError when this split cannot serve such episodes (data/sampler.py)."""
        check_episode_shape(self, n_way, n_shot, n_query)

    def episode_sampler(self, n_way: int, n_shot: int, n_query: int, seed: int):
        """This split's episodes as a batch source (``sample`` / ``state_dict`` / ``load_state_dict``):
        an ``EpisodeSampler``; ``data.sampler.fixed_episodes`` draws evaluation episodes through it."""
        return EpisodeSampler(self, n_way, n_shot, n_query, seed)


@dataclass
class EpisodicDataset:
    """What a data config instantiates to: named splits plus their input shape.

    ``splits`` maps "train", "val", "test" to ClassSplit.
    """

    name: str
    splits: dict[str, ClassSplit]
    #: 16 hex digits of sha256 over the train, val, test class lists (``data.checksum.split_checksum``),
    #: recorded in results.json; by default computed from the splits' class names; each split gets it too
    split_checksum: str | None = None

    def __post_init__(self) -> None:
        parts = ("train", "val", "test")
        if self.split_checksum is None and all(hasattr(self.splits.get(s), "class_names") for s in parts):
            self.split_checksum = split_checksum({s: list(self.splits[s].class_names) for s in parts})
        for split in self.splits.values():
            split.split_checksum = self.split_checksum

    def split(self, name: str) -> ClassSplit:
        if name not in self.splits:
            raise DataError(f"data set {self.name!r} has no split {name!r}; choose one of {sorted(self.splits)}")
        return self.splits[name]

    @property
    def x_shape(self) -> tuple[int, ...]:
        return next(iter(self.splits.values())).x_shape
