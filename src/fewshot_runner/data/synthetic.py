"""A generated, seeded data set of noisy class patterns: for smoke runs and tests, no files needed.

Each class has a random blocky prototype (a coarse random grid, upsampled to the image size,
per channel); its images are that prototype with random brightness, Gaussian pixel noise and
flipped blocks. Classes of different splits are disjoint (each split takes its own range of
class ids), and everything comes from one ``torch.Generator`` seeded with ``seed``, so the same
arguments give bit-identical tensors. A few steps of ProtoNet beat chance by a wide margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot_runner.data.base import ClassSplit, EpisodicDataset
from fewshot_runner.errors import DataError


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"data.{key} must be a positive integer (got {value!r})")


def make_class_images(n_classes: int, per_class: int, image_size: int, channels: int,
                      generator: torch.Generator) -> torch.Tensor:
    """uint8 (n_classes, per_class, channels, image_size, image_size) noisy copies of random prototypes."""
    grid = max(2, image_size // 4)
    shape = (n_classes, channels, grid, grid)
    coarse = (torch.rand(shape, generator=generator) < 0.35).float()
    proto = F.interpolate(coarse, size=(image_size, image_size), mode="nearest")  # (n, C, H, W) in {0, 1}
    # per image: a block or two of the pattern flipped, brightness jitter, pixel noise
    flips = (torch.rand(n_classes, per_class, channels, grid, grid, generator=generator) < 0.08).float()
    flips = F.interpolate(flips.flatten(0, 1), size=(image_size, image_size), mode="nearest").view(
        n_classes, per_class, channels, image_size, image_size)
    pattern = (proto.unsqueeze(1) - flips).abs()
    brightness = 150 + 80 * torch.rand(n_classes, per_class, 1, 1, 1, generator=generator)
    noise = 30 * torch.randn(n_classes, per_class, channels, image_size, image_size, generator=generator)
    return (pattern * brightness + noise).clamp_(0, 255).round_().to(torch.uint8)


def Synthetic(n_classes_train: int = 64, n_classes_val: int = 16, n_classes_test: int = 20, per_class: int = 20,
              image_size: int = 28, channels: int = 1, seed: int = 0) -> EpisodicDataset:
    """An EpisodicDataset named "synthetic" with disjoint train/val/test classes (and trainval = train + val).

    Each split holds uint8 images (n_classes * per_class, channels, image_size, image_size);
    class names are ``class0000``, ``class0001``, ... numbered across splits.
    """
    _check_positive(n_classes_train=n_classes_train, n_classes_val=n_classes_val, n_classes_test=n_classes_test,
                    per_class=per_class, image_size=image_size, channels=channels)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"data.seed must be an integer (got {seed!r})")
    generator = torch.Generator().manual_seed(seed)
    sizes = {"train": n_classes_train, "val": n_classes_val, "test": n_classes_test}
    images = make_class_images(sum(sizes.values()), per_class, image_size, channels, generator)
    splits, start = {}, 0
    for name, n in sizes.items():
        names = [f"class{i:04d}" for i in range(start, start + n)]
        splits[name] = ClassSplit.from_class_major(name, images[start:start + n], names)
        start += n
    n_tv = n_classes_train + n_classes_val  # train + val, for train.split=trainval
    splits["trainval"] = ClassSplit.from_class_major("trainval", images[:n_tv], [f"class{i:04d}" for i in range(n_tv)])
    return EpisodicDataset("synthetic", splits)
