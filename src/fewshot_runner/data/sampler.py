"""Episodic sampling by tensor indexing from a ClassSplit (in memory, or a lazy on-disk store)."""

from __future__ import annotations

from typing import Protocol

import torch

from fewshot_runner.episode import Episode
from fewshot_runner.errors import DataError


class IndexedSplit(Protocol):
    """What sampling reads of a split: ``data.base.ClassSplit`` is one (this module does not import it,
    as ClassSplit's ``episode_sampler`` builds the samplers here)."""

    name: str
    images: torch.Tensor
    counts: torch.Tensor
    index: torch.Tensor
    class_groups: torch.Tensor | None

    @property
    def n_classes(self) -> int: ...

    @property
    def min_per_class(self) -> int: ...

    def episode_sampler(self, n_way: int, n_shot: int, n_query: int, seed: int): ...


def check_episode_shape(split: IndexedSplit, n_way: int, n_shot: int, n_query: int) -> None:
    """Raise a one-line DataError when ``split`` cannot serve the requested episodes."""
    if n_way < 1 or n_shot < 1 or n_query < 1:
        raise DataError(f"n_way, n_shot and n_query must be >= 1 (got {n_way}, {n_shot}, {n_query})")
    if n_way > split.n_classes:
        raise DataError(
            f"data.n_way={n_way} is larger than the {split.n_classes} classes of the {split.name!r} split; "
            f"use data.n_way<={split.n_classes}"
        )
    if n_shot + n_query > split.min_per_class:
        raise DataError(
            f"n_shot + n_query = {n_shot + n_query} is more than the {split.min_per_class} images per class "
            f"of the {split.name!r} split; lower data.n_shot or data.n_query"
        )
    if split.class_groups is not None:
        largest = int(torch.bincount(split.class_groups).max()) if split.n_classes else 0
        if n_way > largest:
            raise DataError(
                f"data.n_way={n_way} is larger than the {largest} classes of the largest group (alphabet) of the "
                f"{split.name!r} split, and its episodes draw their classes from one group; use data.n_way<={largest} "
                f"or data.within_alphabet=false"
            )


class EpisodeSampler:
    """Draws batches of n_way-way n_shot-shot episodes with n_query queries per class.

    Classes are drawn without replacement per task, and support and query images are
    disjoint draws within each class.  The order of the drawn classes is random, so
    labels 0..n_way-1 are a fresh permutation per task.  A split with ``class_groups``
    (``data.within_alphabet=true``) first draws one group per task, uniformly among the groups
    with at least n_way classes, then the classes within it.  All randomness comes from the
    sampler's own ``torch.Generator`` so its state can be checkpointed and restored.

    ``sample`` is ``draw`` (the random index draw, in this process) then ``gather`` (indexing
    ``split.images``, no randomness): ``data.loader.PrefetchingLoader`` runs the gathers in
    DataLoader workers and gives the very same episodes.
    """

    def __init__(self, split: IndexedSplit, n_way: int, n_shot: int, n_query: int, seed: int) -> None:
        check_episode_shape(split, n_way, n_shot, n_query)
        self.split = split
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.generator = torch.Generator().manual_seed(seed)
        # uniform-count splits (Omniglot, miniImageNet) skip the padding mask
        self._uniform = bool((split.counts == split.counts[0]).all())
        self._groups = None  # (class group per class, the groups with n_way classes or more)
        if split.class_groups is not None:
            sizes = torch.bincount(split.class_groups)
            self._groups = (split.class_groups, (sizes >= n_way).nonzero().squeeze(1))

    def sample(self, n_tasks: int) -> Episode:
        """A batch of ``n_tasks`` episodes: ``gather(draw(n_tasks))``."""
        return self.gather(self.draw(n_tasks))

    def draw(self, n_tasks: int) -> torch.Tensor:
        """The random part of ``sample``: item indices (n_tasks, n_way, n_shot + n_query) into
        ``split.images``, way by way, support items first. Only this advances the generator."""
        s, g = self.split, self.generator
        n_way, k = self.n_way, self.n_shot + self.n_query
        # classes: the first n_way of a random permutation per task
        if self._groups is None:
            classes = torch.rand(n_tasks, s.n_classes, generator=g).argsort(dim=1)[:, :n_way]
        else:  # one group per task, then its classes first in the permutation (others keyed past them)
            group_of, eligible = self._groups
            group = eligible[torch.randint(len(eligible), (n_tasks,), generator=g)]
            keys = torch.rand(n_tasks, s.n_classes, generator=g)
            keys = keys.masked_fill(group_of.unsqueeze(0) != group.unsqueeze(1), 2.0)
            classes = keys.argsort(dim=1)[:, :n_way]
        width = s.index.shape[1]
        keys = torch.rand(n_tasks, n_way, width, generator=g)
        if not self._uniform:  # push padding slots to the end
            keys = keys.masked_fill(s.index[classes] < 0, 2.0)
        slots = keys.argsort(dim=2)[:, :, :k]  # (T, n_way, k), distinct per class
        return torch.gather(s.index[classes], 2, slots)

    def gather(self, items: torch.Tensor) -> Episode:
        """The deterministic part of ``sample``: the Episode of drawn ``items`` (no randomness, so it may
        run in a DataLoader worker)."""
        s, n_way = self.split, self.n_way
        n_tasks = items.shape[0]
        x = s.images[items]  # (T, n_way, k, *x_shape)
        labels = torch.arange(n_way).view(1, n_way, 1)
        xs = x[:, :, : self.n_shot].reshape(n_tasks, n_way * self.n_shot, *s.x_shape)
        xq = x[:, :, self.n_shot :].reshape(n_tasks, n_way * self.n_query, *s.x_shape)
        ys = labels.expand(n_tasks, n_way, self.n_shot).reshape(n_tasks, -1)
        yq = labels.expand(n_tasks, n_way, self.n_query).reshape(n_tasks, -1)
        return Episode(xs, ys.clone(), xq, yq.clone(), n_way)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# Evaluation episodes are drawn this many per sampler call, whatever eval.chunk is: which episodes a
# seed gives depends on the seed alone (50 was eval.chunk's default, so earlier default-chunk figures
# see the very same episodes).
EPISODE_BLOCK = 50


def fixed_episodes(split: IndexedSplit, n_way: int, n_shot: int, n_query: int, n_episodes: int, seed: int):
    """Yield ``n_episodes`` evaluation episodes in batches of at most ``EPISODE_BLOCK``.

    Fixed by ``seed``: every run evaluated with the same settings sees the same episodes, and the
    first episodes of a longer run are those of a shorter one (a last, partial block is a full one
    cut short).
    """
    sampler = split.episode_sampler(n_way, n_shot, n_query, seed)  # (any split: a ClassSplit's is an EpisodeSampler)
    done = 0
    while done < n_episodes:
        n = min(EPISODE_BLOCK, n_episodes - done)
        block = sampler.sample(EPISODE_BLOCK)
        yield block if n == EPISODE_BLOCK else block.tasks(0, n)
        done += n
