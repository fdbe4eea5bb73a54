"""A fully connected backbone (the MAML paper's non-convolutional Omniglot net)."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> (BatchNorm1d) -> ReLU per hidden size; input flattened to (N, prod(x_shape))."""

    def __init__(self, x_shape: tuple[int, ...], hidden: list[int] = (256, 128, 64, 64), batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = math.prod(x_shape)
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            d = h
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))
