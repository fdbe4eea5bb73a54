"""What the loop hands to a learner: an episode (or a batch of them), and the plain batches of
learners that do not train on episodes (``LabelledBatch``: class-labelled images, Baseline /
Baseline++ pre-training; ``PairBatch``: same/different pairs, Siamese networks).

Each moves itself with ``.to(device, dtype)`` (uint8 images become float in [0, 1] on the
device), pins itself with ``pin_memory()``, and applies a transform to its images with
``map_inputs(fn)`` (labels untouched).
"""

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

    def map_inputs(self, fn) -> "Episode":
        """``fn`` applied to the images (support_x and query_x, each its own call), labels untouched."""
        return Episode(fn(self.support_x), self.support_y, fn(self.query_x), self.query_y, self.n_way)

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "Episode":
        """Move to ``device``; inputs (x) are cast to ``dtype`` (float), labels keep theirs.

        uint8 images are converted to float in [0, 1] here, on the target device, so the
        host-to-device copy moves 4x fewer bytes.
        """
        args = (device, dtype, non_blocking)
        return Episode(_move_x(self.support_x, *args), _move_y(self.support_y, *args),
                       _move_x(self.query_x, *args), _move_y(self.query_y, *args), self.n_way)

    def pin_memory(self) -> "Episode":
        return self.map_tensors(lambda t: t.pin_memory())


def _move_x(x: torch.Tensor, device, dtype: torch.dtype | None, non_blocking: bool) -> torch.Tensor:
    """Images as ``Episode.to`` moves them: uint8 -> float (``dtype``, default float32) in [0, 1] on the device."""
    x = x.to(device, non_blocking=non_blocking)
    if x.dtype == torch.uint8:
        x = x.to(dtype or torch.float32).div_(255.0)
    elif dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    return x


def _move_y(y: torch.Tensor, device, dtype: torch.dtype | None, non_blocking: bool) -> torch.Tensor:
    """Labels as ``Episode.to`` moves them: class ids keep their dtype, float targets take ``dtype``."""
    y = y.to(device, non_blocking=non_blocking)
    if dtype is not None and y.is_floating_point():
        y = y.to(dtype)
    return y


@dataclass
class LabelledBatch:
    """Class-labelled images drawn from all classes of a split (``data.batches.ClassBatchSampler``).

    x: images (batch, *x_shape); y: long class ids (batch,) in 0..n_classes-1, the split's own
    class ids (``split.class_names[y]`` names them); n_classes: the split's number of classes (the
    width of a classifier head over them).
    """

    x: torch.Tensor
    y: torch.Tensor
    n_classes: int

    def map_inputs(self, fn) -> "LabelledBatch":
        return LabelledBatch(fn(self.x), self.y, self.n_classes)

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "LabelledBatch":
        """As ``Episode.to``: uint8 images become float in [0, 1] on ``device``, labels keep their dtype."""
        return LabelledBatch(_move_x(self.x, device, dtype, non_blocking),
                             _move_y(self.y, device, dtype, non_blocking), self.n_classes)

    def pin_memory(self) -> "LabelledBatch":
        return LabelledBatch(self.x.pin_memory(), self.y.pin_memory(), self.n_classes)


@dataclass
class PairBatch:
    """Pairs of images and whether each pair shows one class (``data.batches.PairSampler``).

    x1, x2: images (batch, *x_shape); same: float (batch,), 1.0 where x1[i] and x2[i] come from the
    same class, 0.0 where from two different classes (a target for binary cross-entropy; ``to``
    casts it to ``dtype`` like float episode targets).
    """

    x1: torch.Tensor
    x2: torch.Tensor
    same: torch.Tensor

    def map_inputs(self, fn) -> "PairBatch":
        return PairBatch(fn(self.x1), fn(self.x2), self.same)

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "PairBatch":
        """As ``Episode.to``: uint8 images become float in [0, 1] on ``device``; ``same`` takes ``dtype``."""
        return PairBatch(_move_x(self.x1, device, dtype, non_blocking), _move_x(self.x2, device, dtype, non_blocking),
                         _move_y(self.same, device, dtype, non_blocking))

    def pin_memory(self) -> "PairBatch":
        return PairBatch(self.x1.pin_memory(), self.x2.pin_memory(), self.same.pin_memory())
