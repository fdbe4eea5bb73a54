"""Conv4 backbones: the ProtoNet / MAML miniImageNet net and the MAML Omniglot net."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.ops.functorch import is_transformed


class ConvBlock(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU -> (max-pool 2 | nothing, with a stride-2 conv); with
    ``downsample=False``: nothing, with a stride-1 conv (the map keeps its size).

    In training mode, or when the norm keeps no running statistics (MAML), batch norm
    uses the batch statistics.  Where the fused kernels are enabled and batch statistics
    are used, BN + ReLU + max-pool run as one op with exact first and second derivatives.
    """

    def __init__(self, c_in: int, c_out: int, pool: bool, fused: bool, downsample: bool = True) -> None:
        super().__init__()
        self.pool = pool and downsample
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2 if downsample and not pool else 1, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.fused = fused
        self.channels_last = False  # set by backbones.use_channels_last
        # a first layer the stem op (conv + BN + ReLU + max-pool fused, ops/stem.py) can run
        self.stem = fused and self.pool and _stem_fits(self.conv)
        # forward_tasks' convolution: ops/conv.py's, whose double backward runs the grouped convolution
        # whole (FEWSHOT_OPS_NO_CONV=1: torch's, for A/B timings)
        self.grouped_conv_op = fused and os.environ.get("FEWSHOT_OPS_NO_CONV", "") in ("", "0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        bn = self.bn
        batch_stats = bn.training or not bn.track_running_stats
        if self.stem and self.channels_last and batch_stats:
            from fewshot_runner.ops.stem import conv_bn_relu_pool, stem_applies

            if stem_applies(x, conv.weight, (conv.bias, bn.weight, bn.bias)):  # a batch of images
                return self._fused_bn(x, lambda stats: conv_bn_relu_pool(x, conv.weight, conv.bias, bn.weight,
                                                                         bn.bias, bn.eps, return_stats=stats))
        if self.channels_last and not is_transformed(x):
            # NHWC maps and weights: oneDNN's fast convolutions (``.to``, not ``.contiguous``: with one
            # input channel only ``.to`` restrides, and the NCHW kernel is then ~10x slower).  Weights
            # are converted here, not only once, because MAML's adapted weights are new tensors.
            x = x.to(memory_format=torch.channels_last)
            w = conv.weight.to(memory_format=torch.channels_last)
            x = F.conv2d(x, w, conv.bias, conv.stride, conv.padding)
        else:
            x = conv(x)
        return self.after_conv(x)

    def after_conv(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm -> ReLU -> (max-pool) on this block's convolution output x (the fused op where it is on and
        batch statistics are used).  Relation Networks call it on a convolution they compute by linearity."""
        bn = self.bn
        batch_stats = bn.training or not bn.track_running_stats
        if self.fused and batch_stats and not is_transformed(x):  # (vmap / grad: the plain path, see norm.py)
            from fewshot_runner.ops import bn_relu_pool

            # (under bf16 autocast x is the conv's bf16 output: the fused op widens it and runs in fp32)
            return self._fused_bn(x, lambda stats: bn_relu_pool(x, bn.weight, bn.bias, eps=bn.eps, pool=self.pool,
                                                                return_stats=stats))
        x = F.relu(bn(x))
        return F.max_pool2d(x, 2) if self.pool else x

    def forward_tasks(self, x: torch.Tensor, p: dict[str, torch.Tensor], n_tasks: int) -> torch.Tensor:
        """This block for ``n_tasks`` tasks at once, each with its own weights: x is (N, T*C_in, H, W),
        task t's maps in channels [t*C_in, (t+1)*C_in); p holds (T, ...) ``conv.weight``, ``conv.bias``,
        ``bn.weight``, ``bn.bias``.  One grouped convolution (groups = T), then batch norm over each
        (task, channel) with batch statistics, as in MAML (the fused op where it is on, else the
        plain ops; neither under torch.func transforms, see adapt_grouped)."""
        conv, bn = self.conv, self.bn
        w = p["conv.weight"]
        w = w.reshape(n_tasks * w.shape[1], *w.shape[2:])
        b = p["conv.bias"].reshape(-1) if p.get("conv.bias") is not None else None
        if self.channels_last:  # one layout for maps and weights: mixed, oneDNN reorders every map
            x = x.contiguous(memory_format=torch.channels_last)
            w = w.contiguous(memory_format=torch.channels_last)
        if self.grouped_conv_op:
            from fewshot_runner.ops.conv import conv2d

            x = conv2d(x, w, b, conv.stride, conv.padding, groups=n_tasks)
        else:
            x = F.conv2d(x, w, b, conv.stride, conv.padding, groups=n_tasks)
        gamma, beta = p["bn.weight"].reshape(-1), p["bn.bias"].reshape(-1)
        if self.fused:
            from fewshot_runner.ops import bn_relu_pool

            return bn_relu_pool(x, gamma, beta, eps=bn.eps, pool=self.pool)
        x = F.relu(F.batch_norm(x, None, None, gamma, beta, training=True, eps=bn.eps))
        return F.max_pool2d(x, 2) if self.pool else x

    def _fused_bn(self, x: torch.Tensor, op) -> torch.Tensor:
        """A fused batch-statistics op (``op(return_stats)``: bn_relu_pool, or the stem op on the
        images x); training with running statistics (ProtoNet) updates them as nn.BatchNorm2d would."""
        bn = self.bn
        if not (bn.training and bn.track_running_stats):
            return op(False)
        from fewshot_runner.ops import update_running_stats

        out, mean, var = op(True)
        # values per channel: N*H*W of the conv's output (the stem's images have the same N, H, W)
        update_running_stats(bn, mean, var, x.numel() // x.shape[1])
        return out


def _stem_fits(conv: nn.Conv2d) -> bool:
    from fewshot_runner.ops.stem import stem_fits

    return stem_fits(conv)


def _fused_available(mode: str) -> bool:
    if mode == "off":
        return False
    try:
        from fewshot_runner.ops import bn_relu_pool  # noqa: F401
    except ImportError:
        if mode == "on":
            raise
        return False
    return True


class Conv4(nn.Module):
    """Four ConvBlocks of ``hidden`` channels, flattened.

    x_shape: (C, H, W) of the inputs; the output is (N, feature_dim), with
    feature_dim = hidden * h * w of the last map (64 for Omniglot 28x28, 1600 for 84x84).
    ``pool_blocks``: only the first that many blocks halve the map (max-pool, or the stride-2 conv with
    ``pool=False``); the later ones keep its size (stride-1 conv, no pooling).  2: the Relation Network's
    embedding (Sung et al. 2018; 7x7 maps on 28x28 images, 21x21 on 84x84).
    """

    def __init__(self, x_shape: tuple[int, ...], hidden: int = 64, pool: bool = True, fused_ops: str = "off",
                 pool_blocks: int = 4) -> None:
        super().__init__()
        fused = _fused_available(fused_ops)
        chans = [x_shape[0], hidden, hidden, hidden, hidden]
        self.blocks = nn.Sequential(*[ConvBlock(chans[i], chans[i + 1], pool, fused, downsample=i < pool_blocks)
                                      for i in range(4)])
        self.has_max_pool = pool and pool_blocks > 0  # (the backbone contract: max-pool blocks make vmap slow on CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).flatten(1)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's feature map (N, hidden, h, w), before flattening (for learners that compare
        maps: ``feature_kind = "map"``)."""
        return self.blocks(x)

    def forward_tasks(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features of T tasks at once, each task with its own weights (MAML's adapted nets).

        x: (T, N, C, H, W); params: this module's parameter names -> (T, *shape) tensors.
        Returns (T, N, feature_dim), equal to ``functional_call(self, params[t], x[t])`` for each t
        when batch norm uses batch statistics (MAML).  The tasks run as the groups of grouped
        convolutions, without torch.func: see ``fewshot_runner.algorithms.maml.adapt_grouped``.
        """
        t, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, t * x.shape[2], *x.shape[3:])  # (N, T*C, H, W)
        for i, block in enumerate(self.blocks):
            prefix = f"blocks.{i}."
            p = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
            h = block.forward_tasks(h, p, t)
        return h.reshape(n, t, -1).transpose(0, 1)
