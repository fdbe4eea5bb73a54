"""Schemas of the backbone group (``backbone=NAME``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fewshot_runner.schemas import register


@register("backbone", "conv4")
@dataclass
class Conv4Config:
    _target_: str = "fewshot_runner.backbones.conv.Conv4"
    hidden: int = 64  # channels of each of the four conv blocks
    pool: bool = True  # max-pool (ProtoNet / MAML miniImageNet) or stride-2 convs (MAML Omniglot)
    pool_blocks: int = 4  # only the first N blocks halve the map; the rest keep it (2: the Relation Network's net)
    fused_ops: str = "${device.fused_ops}"  # off | on | auto


@register("backbone", "mlp")
@dataclass
class MLPConfig:
    _target_: str = "fewshot_runner.backbones.mlp.MLP"
    hidden: list[int] = field(default_factory=lambda: [256, 128, 64, 64])  # widths of the hidden layers
    batch_norm: bool = True  # BatchNorm after each hidden layer
