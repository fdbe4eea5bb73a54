"""Schemas of ``backbone=resnet12`` and ``backbone=wrn28_10`` (backbones/resnet.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fewshot_runner.schemas import register


@dataclass
class DropBlockConfig:
    rate: float = 0.0  # fraction of units dropped in training, in size x size squares (0: off; MetaOptNet: 0.1)
    size: int = 5  # side of the dropped squares, clipped to the map (MetaOptNet on miniImageNet: 5)
    blocks: list[int] = field(default_factory=lambda: [3, 4])  # the residual blocks (1-4) that apply it


@register("backbone", "resnet12")
@dataclass
class ResNet12Config:
    _target_: str = "fewshot_runner.backbones.resnet.ResNet12"
    # widths of the four residual blocks (3 x conv3x3-BN-LeakyReLU each, then max-pool 2); the last is the
    # feature size after the global average pool
    channels: list[int] = field(default_factory=lambda: [64, 160, 320, 640])
    leaky_slope: float = 0.1  # negative slope of the LeakyReLUs
    drop_block: DropBlockConfig = field(default_factory=lambda: DropBlockConfig())  # DropBlock in training


@register("backbone", "wrn28_10")
@dataclass
class WideResNetConfig:
    _target_: str = "fewshot_runner.backbones.resnet.WideResNet"
    depth: int = 28  # 6n + 4 layers: n pre-activation blocks in each of the three groups
    widen_factor: int = 10  # widths 16k, 32k, 64k: 640 features for k = 10
    dropout: float = 0.0  # dropout between the two convolutions of each block, in training (0: off)
