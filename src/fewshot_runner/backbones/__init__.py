"""Feature extractors. Each maps (N, *x_shape) -> (N, feature_dim) and is a plain nn.Module,
so gradient-based meta-learners can run it with ``torch.func.functional_call``."""

from __future__ import annotations

import torch
from torch import nn


def use_channels_last(module: nn.Module) -> nn.Module:
    """Run ``module``'s convolutional blocks in channels-last (NHWC) memory: 4-d parameters are
    converted and every submodule with a ``channels_last`` attribute (``ConvBlock``) turns it on,
    so its inputs and weights are handed to the convolution NHWC (the fused batch-norm op then
    runs its NHWC kernels).  Results are the same up to fp32 rounding; see docs/speed.md for speed."""
    for m in module.modules():
        if hasattr(m, "channels_last"):
            m.channels_last = True
    return module.to(memory_format=torch.channels_last)
