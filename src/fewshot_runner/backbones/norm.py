"""Batch norm that stays correct under ``torch.func`` transforms.

Second-order MAML under ``torch.func.vmap`` with the fused ``F.batch_norm`` kernel gives wrong
meta-gradients (FIELD_NOTES: 2-30 % off even in float64; conv biases, whose meta-gradient is
exactly 0 before a training-mode batch norm, come out around 2e-2).  Batch norm written with
mean / var / rsqrt is correct there.  :class:`TransformSafeBatchNorm` uses the primitives only
when its input comes from a transform (vmap / grad) and batch statistics are in use, and the
fused kernel otherwise, so the plain per-task loop keeps its speed.
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot_runner.ops.functorch import is_transformed


def batch_norm_primitive(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    """Training-mode batch norm (biased batch variance, no running statistics) from primitives.

    x: (N, C, *spatial); weight, bias: (C,) or None.
    """
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dims, keepdim=True)
    y = xc * torch.rsqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


class TransformSafeBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A drop-in batch norm (1d/2d/3d: same parameters and state-dict keys) whose batch-statistics
    path is :func:`batch_norm_primitive` under ``torch.func`` transforms."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training or not self.track_running_stats or self.running_mean is None
        if batch_stats and is_transformed(x):
            if self.track_running_stats and self.running_mean is not None and self.training:
                raise RuntimeError("TransformSafeBatchNorm cannot update running statistics under torch.func "
                                   "transforms; disable them (track_running_stats=False), as MAML does")
            return batch_norm_primitive(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def make_transform_safe(module: nn.Module) -> nn.Module:
    """Replace every batch norm of ``module`` (in place) by a :class:`TransformSafeBatchNorm` holding the
    same parameters and buffers; returns ``module``."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, TransformSafeBatchNorm):
                safe = TransformSafeBatchNorm.__new__(TransformSafeBatchNorm)
                safe.__dict__ = child.__dict__  # parameters, buffers, eps, momentum, flags: shared, not copied
                setattr(parent, name, safe)
    return module
