"""Background loading: a batch source's gathers run in DataLoader workers, its draws stay here.

A batch source (``EpisodeSampler``, ``ClassBatchSampler``, ``PairSampler``) splits ``sample(n)``
into ``draw(n)`` (every random number, from the source's own generator) and ``gather(drawn)``
(reading the images: no randomness). ``PrefetchingLoader`` calls ``draw`` in this process, in
order, and ships each draw to a ``torch.utils.data.DataLoader`` worker that gathers it, a few
batches ahead; the DataLoader hands the batches back in draw order. So the batches are bitwise
those of ``source.sample(n)``, worker count or timing notwithstanding.

Checkpoints: ``state_dict()`` is the source's state after the last batch *handed out*, in the
source's own format (a checkpoint of either can resume the other). Batches drawn ahead but not yet
handed out are drawn again after ``load_state_dict``, so a killed-and-resumed run sees the same
batches as one that ran through.

The DataLoader gets its own ``torch.Generator`` (for its worker seeds): the global generators,
which a resume restores and the transforms draw from, are never touched here.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset


class BatchSource(Protocol):
    """What ``PrefetchingLoader`` needs of a sampler: ``sample(n) == gather(draw(n))``."""

    def draw(self, n: int) -> Any: ...

    def gather(self, drawn: Any) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _Gather(Dataset):
    """``dataset[drawn] = source.gather(drawn)``: what a worker runs."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source

    def __getitem__(self, drawn):
        return self.source.gather(drawn)


class _Draws:
    """The DataLoader's sampler: draws forever in this process, noting the source's state after each draw."""

    def __init__(self, source: BatchSource, states: deque) -> None:
        self.source, self.states, self.n = source, states, 1

    def __iter__(self):
        while True:
            drawn = self.source.draw(self.n)
            self.states.append(self.source.state_dict())
            yield drawn


def _as_is(batch):
    return batch


class PrefetchingLoader:
    """``sample(n)`` as ``source.sample(n)``, with the gathering done ahead in ``num_workers`` workers.

    num_workers: DataLoader worker processes (0: gather here, no prefetching; same batches).
    prefetch: batches each worker holds ready (the DataLoader's ``prefetch_factor``).
    pin_memory: hand out page-locked batches (for asynchronous copies to a CUDA device).

    Changing ``n`` between calls, or ``load_state_dict``, drops the batches drawn ahead and draws
    again from the state of the last batch handed out. ``close()`` (or ``with``) stops the workers.
    """

    def __init__(self, source: BatchSource, num_workers: int = 2, prefetch: int = 2, pin_memory: bool = False) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0 (got {num_workers!r})")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1 (got {prefetch!r})")
        self.source = source
        self._states: deque = deque()
        self._draws = _Draws(source, self._states)
        workers = {"prefetch_factor": prefetch, "persistent_workers": True} if num_workers else {}
        self._loader = DataLoader(_Gather(source), batch_size=None, sampler=self._draws, num_workers=num_workers,
                                  collate_fn=_as_is, pin_memory=pin_memory, generator=torch.Generator(), **workers)
        self._consumed = source.state_dict()
        self._it = None

    def sample(self, n: int) -> Any:
        """The next batch of ``n`` (episodes, labelled images or pairs, as the source makes them)."""
        if self._it is None or n != self._draws.n:
            self._restart(n)
        batch = next(self._it)
        self._consumed = self._states.popleft()
        return batch

    def _restart(self, n: int) -> None:
        self.source.load_state_dict(self._consumed)  # undo the draws of batches never handed out
        self._states.clear()
        self._draws.n = int(n)
        self._it = iter(self._loader)  # persistent workers drop what they still held

    def state_dict(self) -> dict:
        """The source's state after the last batch handed out (the source's own format)."""
        return self._consumed

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)
        self._consumed = self.source.state_dict()
        if self._it is not None:
            self._restart(self._draws.n)

    def close(self) -> None:
        """Stop the workers (they stop too when the loader is garbage-collected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._loader._iterator = None
        if it is not None:
            self.source.load_state_dict(self._consumed)

    def __enter__(self) -> "PrefetchingLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
