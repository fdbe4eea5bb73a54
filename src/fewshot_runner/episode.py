"""The one object the loop hands to an algorithm: an episode, or a batch of them."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Episode:
    """A few-shot task split once into support and query.

    Single task:   support_x (n_way*n_shot, *x_shape), support_y (n_way*n_shot,)
                   query_x   (n_way*n_query, *x_shape), query_y   (n_way*n_query,)
    Batch of tasks: the same with a leading task dimension (n_tasks, ...).

    Labels are class indices 0..n_way-1 (long) for classification, or targets (float)
    for regression.  ``n_way`` is carried so algorithms never infer it from labels.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    n_way: int

    @property
    def batched(self) -> bool:
        return self.support_y.dim() == 2

    @property
    def n_tasks(self) -> int:
        return self.support_y.shape[0] if self.batched else 1

    def task(self, i: int) -> "Episode":
        """The i-th task of a batch, as a single-task Episode."""
        if not self.batched:
            raise ValueError("task(i) needs a batch of episodes")
        return Episode(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i], self.n_way)

    def tasks(self, start: int, stop: int) -> "Episode":
        """Tasks start..stop-1 of a batch, still batched."""
        return Episode(
            self.support_x[start:stop], self.support_y[start:stop],
            self.query_x[start:stop], self.query_y[start:stop], self.n_way,
        )

    def map_tensors(self, fn) -> "Episode":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = fn(v)
        return Episode(**kw)

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "Episode":
        """Move to ``device``; inputs (x) are cast to ``dtype`` (float), labels keep theirs.

        uint8 images are converted to float in [0, 1] here, on the target device, so the
        host-to-device copy moves 4x fewer bytes.
        """

        def move_x(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=non_blocking)
            if x.dtype == torch.uint8:
                x = x.to(dtype or torch.float32).div_(255.0)
            elif dtype is not None and x.is_floating_point():
                x = x.to(dtype)
            return x

        def move_y(y: torch.Tensor) -> torch.Tensor:
            y = y.to(device, non_blocking=non_blocking)
            if dtype is not None and y.is_floating_point():
                y = y.to(dtype)
            return y

        return Episode(move_x(self.support_x), move_y(self.support_y),
                       move_x(self.query_x), move_y(self.query_y), self.n_way)

    def pin_memory(self) -> "Episode":
        return self.map_tensors(lambda t: t.pin_memory())
