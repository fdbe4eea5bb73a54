"""Batch sources for learners that do not train on episodes, drawn from a ClassSplit.

``ClassBatchSampler``: class-labelled mini-batches over all classes of the split (Baseline and
Baseline++ pre-training, a classifier head over the split's classes). ``PairSampler``: pairs of
images, half from one class and half from two different classes (Siamese networks).
``EpisodesByImages``: an ``EpisodeSampler`` whose ``sample(n)`` draws as many whole episodes as
``n`` items' images hold (Siamese networks' all-pairs training: a batch of ``n`` pairs' images).

Like ``EpisodeSampler``: all randomness from the source's own ``torch.Generator`` (seeded, so a
seed gives the same batches; ``state_dict``/``load_state_dict`` to checkpoint it), ``sample(n)``
is ``gather(draw(n))`` so ``PrefetchingLoader`` can gather in DataLoader workers, and the images
come from ``split.images`` (in memory or a lazy store) as uint8.
"""

from __future__ import annotations

import torch

from fewshot_runner.data.base import ClassSplit
from fewshot_runner.episode import LabelledBatch, PairBatch
from fewshot_runner.errors import DataError


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"the batch size must be a positive integer (got {n!r})")
    return n


class ClassBatchSampler:
    """Mini-batches of (image, class id) over every item of ``split``, epoch by epoch.

    Each epoch is a fresh random permutation of all the split's items; batches are consecutive
    runs of it, and a batch that reaches an epoch's end continues into the next epoch's
    permutation (every batch holds exactly ``n`` items; within an epoch no item repeats). Labels
    are the split's class ids, 0..split.n_classes-1.
    """

    def __init__(self, split: ClassSplit, seed: int) -> None:
        if split.images.shape[0] < 1:
            raise DataError(f"the {split.name!r} split holds no images to draw batches from")
        self.split = split
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_state = self.generator.get_state()  # the generator before this epoch's permutation
        self._perm = torch.randperm(split.images.shape[0], generator=self.generator)
        self._cursor = 0
        self._epoch = 0

    def _next_epoch(self) -> None:
        self._epoch_state = self.generator.get_state()
        self._perm = torch.randperm(self.split.images.shape[0], generator=self.generator)
        self._cursor = 0
        self._epoch += 1

    def draw(self, n: int) -> torch.Tensor:
        """Item indices (n,) into ``split.images``: the next ``n`` of the epoch permutation(s)."""
        _check_n(n)
        parts = []
        while n > 0:
            if self._cursor == len(self._perm):
                self._next_epoch()
            take = min(n, len(self._perm) - self._cursor)
            parts.append(self._perm[self._cursor:self._cursor + take])
            self._cursor += take
            n -= take
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def gather(self, items: torch.Tensor) -> LabelledBatch:
        """The LabelledBatch of drawn ``items`` (no randomness)."""
        return LabelledBatch(self.split.images[items], self.split.labels[items], self.split.n_classes)

    def sample(self, n: int) -> LabelledBatch:
        """The next ``n`` images with their class ids: x (n, *x_shape) uint8, y (n,) long."""
        return self.gather(self.draw(n))

    @property
    def epoch(self) -> int:
        """Epochs begun before the current one (0 during the first)."""
        return self._epoch

    def state_dict(self) -> dict:
        return {"generator": self._epoch_state.clone(), "cursor": self._cursor, "epoch": self._epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._epoch_state = self.generator.get_state()
        self._perm = torch.randperm(self.split.images.shape[0], generator=self.generator)
        self._cursor = int(state["cursor"])
        self._epoch = int(state["epoch"])


class PairSampler:
    """Pairs of images of ``split`` with a same-class flag: in a batch of ``n``, ``n // 2`` pairs from
    one class (two distinct images of it) and the rest from two different classes, in random order.

    Classes are drawn uniformly (not by their image counts), images uniformly within a class.
    Needs at least 2 classes and 2 images in every class.
    """

    def __init__(self, split: ClassSplit, seed: int) -> None:
        if split.n_classes < 2:
            raise DataError(f"pairs need at least 2 classes; the {split.name!r} split has {split.n_classes}")
        if split.min_per_class < 2:
            raise DataError(f"pairs need at least 2 images in every class; a class of the {split.name!r} split has "
                            f"{split.min_per_class}")
        self.split = split
        self.generator = torch.Generator().manual_seed(seed)

    def _slot(self, classes: torch.Tensor) -> torch.Tensor:
        """A uniform slot (position within its class) for each class of ``classes``."""
        counts = self.split.counts[classes]
        u = torch.rand(classes.shape, generator=self.generator, dtype=torch.float64)
        return torch.minimum((u * counts).long(), counts - 1)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(items1 (n,), items2 (n,), same (n,) float 1/0): indices into ``split.images``."""
        _check_n(n)
        g, s = self.generator, self.split
        same = torch.zeros(n)
        same[torch.randperm(n, generator=g)[: n // 2]] = 1.0
        c1 = torch.randint(s.n_classes, (n,), generator=g)
        shift = torch.randint(1, s.n_classes, (n,), generator=g)  # another class: c1 + 1 .. c1 + C-1 (mod C)
        c2 = torch.where(same.bool(), c1, (c1 + shift) % s.n_classes)
        slot1 = self._slot(c1)
        counts = s.counts[c2]
        u = torch.rand(n, generator=g, dtype=torch.float64)
        other = torch.minimum((u * counts).long(), counts - 1)  # a slot of c2
        within = (slot1 + 1 + torch.minimum((u * (counts - 1)).long(), counts - 2)) % counts  # another slot of c1
        slot2 = torch.where(same.bool(), within, other)
        return s.index[c1, slot1], s.index[c2, slot2], same

    def gather(self, drawn: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> PairBatch:
        """The PairBatch of drawn item pairs (no randomness)."""
        items1, items2, same = drawn
        return PairBatch(self.split.images[items1], self.split.images[items2], same)

    def sample(self, n: int) -> PairBatch:
        """The next ``n`` pairs: x1, x2 (n, *x_shape) uint8, same (n,) float (1.0 same class, 0.0 not)."""
        return self.gather(self.draw(n))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class EpisodesByImages:
    """Episodes of ``sampler`` (an ``EpisodeSampler``) counted in images: ``sample(n)`` draws
    ``max(1, (images_per_item * n) // episode_images)`` whole episodes, where ``episode_images`` is
    n_way x (n_shot + n_query).  So ``n`` keeps meaning what it means for the learner's other source
    (Siamese networks: ``n`` pairs, 2 images each), and switching sources keeps the images per step.
    The state is the sampler's."""

    def __init__(self, sampler, images_per_item: int) -> None:
        self.sampler = sampler
        self.images_per_item = images_per_item
        self.episode_images = sampler.n_way * (sampler.n_shot + sampler.n_query)

    def episodes(self, n: int) -> int:
        """How many episodes ``sample(n)`` draws."""
        return max(1, self.images_per_item * _check_n(n) // self.episode_images)

    def draw(self, n: int) -> torch.Tensor:
        return self.sampler.draw(self.episodes(n))

    def gather(self, items: torch.Tensor):
        return self.sampler.gather(items)

    def sample(self, n: int):
        return self.gather(self.draw(n))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
