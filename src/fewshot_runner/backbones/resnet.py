"""Residual backbones of the few-shot literature: ResNet-12 (TADAM, MetaOptNet) and WRN-28-10 (LEO, S2M2).

Both follow the backbone contract (backbones/__init__.py): ``forward(x)`` (N, *x_shape) -> (N, 640) after a
global average pool, ``forward_map(x)`` -> the last feature map before it, ``has_max_pool``.  Convolutions have
no bias (a batch norm follows each), so the gradient-based learners adapt every weight through
``torch.func.functional_call`` like any other backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.errors import UserError


def drop_block(x: torch.Tensor, rate: float, size: int) -> torch.Tensor:
    """DropBlock (Ghiasi et al. 2018) on maps x (N, C, H, W): zero ``size`` x ``size`` squares whose seeds
    are drawn with probability gamma = rate / size^2 * HW / ((H - size + 1)(W - size + 1)) (so about
    ``rate`` of the units are dropped), then rescale the kept units by (kept fraction)^-1.  torch's global
    generator draws the seeds (a resumed run restores it)."""
    n, c, h, w = x.shape
    size = min(size, h, w)
    gamma = rate / size**2 * (h * w) / ((h - size + 1) * (w - size + 1))
    seeds = torch.bernoulli(torch.full((n, c, h - size + 1, w - size + 1), gamma, dtype=x.dtype, device=x.device))
    # a seed at (i, j) covers [i, i + size) x [j, j + size): pad by size - 1, then a size-wide max filter
    blocks = F.max_pool2d(F.pad(seeds, (size - 1,) * 4), size, stride=1)
    keep = 1.0 - blocks
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


def init_convs(module: nn.Module, nonlinearity: str, slope: float) -> None:
    """He-normal convolution weights (fan-out), as the reference code of both nets; batch norms keep 1 and 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=slope, mode="fan_out", nonlinearity=nonlinearity)


class ResBlock12(nn.Module):
    """ResNet-12's block: three conv3x3-BN-LeakyReLU (the last activation after the residual sum with a
    conv1x1-BN shortcut), then max-pool 2 and, where ``drop_rate`` > 0, DropBlock in training mode."""

    def __init__(self, c_in: int, c_out: int, slope: float, drop_rate: float, drop_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.slope = slope
        self.drop_rate = drop_rate
        self.drop_size = drop_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
        out = F.leaky_relu(self.bn2(self.conv2(out)), self.slope)
        out = self.bn3(self.conv3(out))
        out = F.max_pool2d(F.leaky_relu(out + self.shortcut(x), self.slope), 2)
        if self.training and self.drop_rate > 0:
            out = drop_block(out, self.drop_rate, self.drop_size)
        return out


class ResNet12(nn.Module):
    """ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): four :class:`ResBlock12` of ``channels`` (64-160-320-640),
    each halving the map (84 -> 42 -> 21 -> 10 -> 5), then a global average pool: (N, channels[-1]).

    ``drop_block``: ``rate`` (0: off), ``size`` (the square's side, clipped to the map) and ``blocks`` (which
    blocks, 1-based, apply it; MetaOptNet: rate 0.1, size 5 on miniImageNet, blocks 3 and 4).
    """

    has_max_pool = True  # (the backbone contract: max-pool blocks make vmap slow on CPU)

    def __init__(self, x_shape: tuple[int, ...], channels: Sequence[int] = (64, 160, 320, 640),
                 leaky_slope: float = 0.1, drop_block: dict | None = None) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 4 or min(channels) < 1:
            raise UserError(f"backbone.channels={channels} must be four positive widths, e.g. [64,160,320,640]")
        db = dict(drop_block or {})
        rate, size, on = float(db.get("rate", 0.0)), int(db.get("size", 5)), [int(b) for b in db.get("blocks", (3, 4))]
        if not 0.0 <= rate < 1.0 or size < 1 or not set(on) <= {1, 2, 3, 4}:
            raise UserError(f"backbone.drop_block={db} needs 0 <= rate < 1, size >= 1 and blocks among 1-4, "
                            f"e.g. backbone.drop_block.rate=0.1 backbone.drop_block.size=5")
        chans = [x_shape[0], *channels]
        self.blocks = nn.Sequential(*[ResBlock12(chans[i], chans[i + 1], leaky_slope, rate if i + 1 in on else 0.0,
                                                 size) for i in range(4)])
        init_convs(self, "leaky_relu", leaky_slope)  # as MetaOptNet's code

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map (N, channels[-1], h, w), before the average pool."""
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean((2, 3))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block: BN-ReLU-conv3x3(stride)-BN-ReLU-(dropout)-conv3x3, plus the input
    (or, where the width or stride changes, a conv1x1(stride) of the activated input)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None if c_in == c_out and stride == 1 else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv1(a)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016) as in the few-shot literature (LEO, S2M2:
    WRN-28-10): conv3x3(16), three groups of (depth - 4) / 6 :class:`WideBlock` of 16k, 32k, 64k channels
    with strides 1, 2, 2 (84 -> 84 -> 42 -> 21), BN-ReLU, global average pool: (N, 64k) = (N, 640)."""

    def __init__(self, x_shape: tuple[int, ...], depth: int = 28, widen_factor: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0 or widen_factor < 1:
            raise UserError(f"backbone.depth={depth} must be 6n + 4 (10, 16, 22, 28, ...) and backbone.widen_factor "
                            f"a positive integer; WRN-28-10 is depth=28 widen_factor=10")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"backbone.dropout={dropout} must be in [0, 1)")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv = nn.Conv2d(x_shape[0], widths[0], 3, padding=1, bias=False)
        layers = []
        for g, stride in enumerate((1, 2, 2)):
            for b in range(n):
                layers.append(WideBlock(widths[g] if b == 0 else widths[g + 1], widths[g + 1], stride if b == 0 else 1,
                                        dropout))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[-1])
        init_convs(self, "relu", 0.0)  # as the WRN and S2M2 code

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The final BN-ReLU map (N, 64k, h, w), before the average pool."""
        return F.relu(self.bn(self.blocks(self.conv(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean((2, 3))
