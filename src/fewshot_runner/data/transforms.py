"""The transform hook: per-data-set normalisation and training-only augmentation, in one place.

Transforms work on float images in [0, 1] ON THE DEVICE, after ``Episode.to`` (or
``LabelledBatch.to`` / ``PairBatch.to``) has turned the uint8 images into floats there:
``batch.to(device, dtype).map_inputs(train_tf)``. They take any leading dimensions,
(..., C, H, W): one image, a batch, or a batch of tasks (T, n, C, H, W); each image gets its own
random crop, flip and jitter.

Randomness comes from torch's *global* generator of the images' device (``torch.rand(...,
device=x.device)``), so a run seeded with ``torch.manual_seed`` is reproducible and a resume must
restore the global RNG state (the checkpoint's ``rng``) for the augmentations to continue as they
would have. The evaluation transform never draws a random number: it only normalises.

Config (``data.normalize`` / ``data.augment``; the defaults change nothing)::

    normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}   # or null; per channel, on [0, 1]
    augment: {crop_padding: 0, flip: false, color_jitter: 0.0, affine: false}

Order in training: Koch et al.'s random affine distortion (``affine``: rotation, shear, scale and
translation, each included with probability 1/2, see :class:`RandomAffine`), random crop (zero padding, then a window of the original size), horizontal
flip (probability 1/2), colour jitter (brightness, contrast, saturation, in that order, each
factor uniform in [max(0, 1 - s), 1 + s], as torchvision's ``ColorJitter(s, s, s)`` draws them,
results clamped to [0, 1]), then normalisation ``(x - mean) / std``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Callable

import torch

from fewshot_runner.errors import DataError

Transform = Callable[[torch.Tensor], torch.Tensor]
AUGMENT_DEFAULTS = {"crop_padding": 0, "flip": False, "color_jitter": 0.0, "affine": False}


def _check_image(x: torch.Tensor, what: str) -> None:
    if x.dim() < 3 or not x.is_floating_point():
        raise DataError(f"{what} needs float images (..., C, H, W) after .to(device); got {x.dtype} {tuple(x.shape)}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-3:])


class Normalize:
    """``(x - mean) / std`` per channel, on float images (..., C, H, W)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self._cache: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "data.normalize")
        c = x.shape[-3]
        if len(self.mean) not in (1, c):
            raise DataError(f"data.normalize.mean has {len(self.mean)} values but the images have {c} channels: "
                            f"give one value per channel")
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = (torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1),
                                torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1))
        mean, std = self._cache[key]
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomCrop:
    """Zero-pad each image by ``padding`` on every side, then cut an H x W window at a uniform offset."""

    def __init__(self, padding: int) -> None:
        self.padding = int(padding)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "data.augment.crop_padding")
        p = self.padding
        flat = _flat(x)
        n, c, h, w = flat.shape
        padded = torch.nn.functional.pad(flat, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), device=x.device)
        ox = torch.randint(0, 2 * p + 1, (n,), device=x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n, 1, h, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n, 1, 1, w)
        out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                     torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
        return out.reshape(x.shape)

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Each image mirrored left-right with probability 1/2."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "data.augment.flip")
        flat = _flat(x)
        flip = torch.rand(flat.shape[0], device=x.device) < 0.5
        return torch.where(flip[:, None, None, None], flat.flip(-1), flat).reshape(x.shape)

    def __repr__(self) -> str:
        return "RandomHorizontalFlip()"


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of (n, C, H, W) images as torchvision computes it, (n, 1, H, W); one channel is its own gray."""
    if x.shape[1] == 3:
        return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return x.mean(1, keepdim=True)


class ColorJitter:
    """Brightness, contrast and saturation, each scaled by a factor uniform in [max(0, 1 - s), 1 + s]
    per image, applied in that order and clamped to [0, 1] (saturation leaves 1-channel images alone)."""

    def __init__(self, strength: float) -> None:
        self.strength = float(strength)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "data.augment.color_jitter")
        s = self.strength
        flat = _flat(x)
        n = flat.shape[0]
        lo, hi = max(0.0, 1.0 - s), 1.0 + s
        f = lo + (hi - lo) * torch.rand(3, n, 1, 1, 1, device=x.device, dtype=x.dtype)
        out = (flat * f[0]).clamp(0, 1)  # brightness: blend with black
        out = (f[1] * out + (1 - f[1]) * _gray(out).mean((-3, -2, -1), keepdim=True)).clamp(0, 1)  # contrast
        if out.shape[1] == 3:  # saturation: blend with the gray image
            out = (f[2] * out + (1 - f[2]) * _gray(out)).clamp(0, 1)
        return out.reshape(x.shape)

    def __repr__(self) -> str:
        return f"ColorJitter({self.strength})"


def affine_warp(x: torch.Tensor, angle: torch.Tensor, shear: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor) -> torch.Tensor:
    """Images (n, C, H, W) under the affine maps T = R(angle) @ Shear(shear) @ Scale(scale), then ``shift``:
    an image point p (pixels from the image centre, x right, y down) moves to T p + shift.  angle (n,)
    radians (positive: clockwise on the screen, y pointing down); shear (n, 2) (rho_x, rho_y): [[1, rho_x],
    [rho_y, 1]]; scale (n, 2) (s_x, s_y); shift (n, 2) pixels (t_x, t_y).  Bilinear sampling, zeros outside
    the image (Omniglot's background after inversion).  Each output pixel reads the input at the inverse map."""
    n, _, h, w = x.shape
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    one = torch.ones_like(angle)
    sh = torch.stack([torch.stack([one, shear[:, 0]], -1), torch.stack([shear[:, 1], one], -1)], -2)
    t = rot @ sh @ torch.diag_embed(scale)  # (n, 2, 2), pixel units
    inv = torch.linalg.inv(t)
    # normalised coordinates (align_corners=False): u = p * 2 / size, so the inverse map there is N inv N^-1
    norm = torch.tensor([2.0 / w, 2.0 / h], dtype=x.dtype, device=x.device)
    theta_lin = inv * norm[:, None] / norm[None, :]
    theta_t = -(inv @ shift.unsqueeze(-1)).squeeze(-1) * norm
    theta = torch.cat([theta_lin, theta_t.unsqueeze(-1)], -1)  # (n, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class RandomAffine:
    """Koch, Zemel & Salakhutdinov (2015)'s affine distortions, per image: rotation theta in [-10, 10] degrees,
    shear rho_x, rho_y in [-0.3, 0.3], scale s_x, s_y in [0.8, 1.2], translation t_x, t_y in [-2, 2] pixels,
    each uniform, and each of the four included with probability 1/2 (else the identity).  The random numbers:
    one ``torch.rand(n, 11)`` from the global generator of the images' device."""

    ROTATION_DEG, SHEAR, SCALE, SHIFT_PX = 10.0, 0.3, (0.8, 1.2), 2.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "data.augment.affine")
        flat = _flat(x)
        n = flat.shape[0]
        u = torch.rand(n, 11, device=x.device).to(x.dtype)
        on = u[:, :4] < 0.5  # rotation, shear, scale, translation
        angle = torch.where(on[:, 0], (2 * u[:, 4] - 1) * self.ROTATION_DEG * math.pi / 180, 0.0)
        shear = torch.where(on[:, 1:2], (2 * u[:, 5:7] - 1) * self.SHEAR, 0.0)
        lo, hi = self.SCALE
        scale = torch.where(on[:, 2:3], lo + (hi - lo) * u[:, 7:9], 1.0)
        shift = torch.where(on[:, 3:4], (2 * u[:, 9:11] - 1) * self.SHIFT_PX, 0.0)
        return affine_warp(flat, angle, shear, scale, shift).reshape(x.shape)

    def __repr__(self) -> str:
        return "RandomAffine(Koch et al. 2015)"


class Chain:
    """Transforms applied in order."""

    def __init__(self, steps: Sequence[Transform]) -> None:
        self.steps = list(steps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return f"Chain({self.steps})"


# ----------------------------------------------------------------------------- from config
def _numbers(value, key: str) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or \
            not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        raise DataError(f"data.normalize.{key} must be a list of numbers, one per channel (got {value!r})")
    return [float(v) for v in value]


def _normalize(cfg) -> Normalize | None:
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise DataError(f"data.normalize must be null or {{mean: [...], std: [...]}} (got {cfg!r})")
    unknown = sorted(set(cfg) - {"mean", "std"})
    if unknown:
        raise DataError(f"data.normalize has no key {unknown[0]!r}: it takes mean and std")
    for key in ("mean", "std"):
        if cfg.get(key) is None:
            raise DataError(f"data.normalize.{key} is missing: give mean and std, one value per channel (on [0, 1] images)")
    mean, std = _numbers(cfg["mean"], "mean"), _numbers(cfg["std"], "std")
    if len(mean) != len(std):
        raise DataError(f"data.normalize.mean has {len(mean)} values but data.normalize.std has {len(std)}: one per channel each")
    if not all(abs(v) < float("inf") for v in mean):
        raise DataError(f"data.normalize.mean must be finite numbers (got {mean})")
    if not all(0 < s < float("inf") for s in std):
        raise DataError(f"data.normalize.std must be positive and finite (got {std})")
    return Normalize(mean, std)


def _augment(cfg) -> list[Transform]:
    if cfg is None:
        return []
    if not isinstance(cfg, Mapping):
        raise DataError(f"data.augment must be null or {{crop_padding: 0, flip: false, color_jitter: 0.0, affine: false}} "
                        f"(got {cfg!r})")
    unknown = sorted(set(cfg) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise DataError(f"data.augment has no key {unknown[0]!r}: it takes {', '.join(AUGMENT_DEFAULTS)}")
    cfg = {**AUGMENT_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    pad, flip, jitter, affine = cfg["crop_padding"], cfg["flip"], cfg["color_jitter"], cfg["affine"]
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise DataError(f"data.augment.crop_padding must be an integer >= 0 (got {pad!r})")
    if not isinstance(flip, bool):
        raise DataError(f"data.augment.flip must be true or false (got {flip!r})")
    if isinstance(jitter, bool) or not isinstance(jitter, Real) or not 0 <= jitter < float("inf"):
        raise DataError(f"data.augment.color_jitter must be a number >= 0 (got {jitter!r})")
    if not isinstance(affine, bool):
        raise DataError(f"data.augment.affine must be true or false (got {affine!r})")
    steps: list[Transform] = []
    if affine:
        steps.append(RandomAffine())
    if pad:
        steps.append(RandomCrop(pad))
    if flip:
        steps.append(RandomHorizontalFlip())
    if jitter:
        steps.append(ColorJitter(float(jitter)))
    return steps


def build_transforms(normalize: Mapping | None = None, augment: Mapping | None = None,
                     channels: int | None = None) -> tuple[Transform | None, Transform | None]:
    """(train_tf, eval_tf) from ``data.normalize`` and ``data.augment``; each None where it is the identity.

    train_tf: augmentation (if any) then normalisation; eval_tf: normalisation only, never random.
    channels: the images' channel count, to check ``normalize`` against before the first batch.
    A bad value is a one-line DataError naming the key.
    """
    norm = _normalize(normalize)
    steps = _augment(augment)
    if norm is not None and channels is not None and len(norm.mean) not in (1, channels):
        raise DataError(f"data.normalize.mean has {len(norm.mean)} values but the images have {channels} channels: "
                        f"give one value per channel")
    train_steps = steps + ([norm] if norm is not None else [])
    train_tf = None if not train_steps else train_steps[0] if len(train_steps) == 1 else Chain(train_steps)
    return train_tf, norm
