"""A 2-d convolution whose double backward runs grouped convolutions as one call each.

``conv2d(x, weight, bias, stride, padding, groups)`` equals ``F.conv2d`` with the same arguments,
including its gradients and the gradients of its gradients (second-order MAML).  Why it exists:
torch's generic double backward of a convolution (``aten::_convolution_double_backward``) computes
the weight term of the double backward, ``conv(ggx, gy)`` with batch and channels swapped, group by
group when ``groups > 1`` (one convolution per group, then a ``cat``).  MAML's grouped path
(``device.batch_tasks=groups``: a 32-task batch as the 32 groups of one convolution) then pays for
32 small convolutions per layer and a copy of their results.  Here every term is one
``aten::convolution`` or ``aten::convolution_backward`` call, which take ``groups`` natively.

Math (y = conv(x, w) + b; gx, gw, gb its backward, linear in gy; given ggx, ggw, ggb):
``g_gy = conv(ggx, w) + conv(x, ggw) + ggb``, ``g_x = conv_backward_input(gy, ggw)``,
``g_w = conv_backward_weight(ggx, gy)``.  The double backward is not differentiable again
(third order raises).  Dilation 1, zero padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["conv2d"]

_aten = torch.ops.aten


def _backward(gy, x, w, stride, padding, groups, mask):
    """(gx, gw) of conv(x, w) for the output gradient gy; ``mask`` says which to compute."""
    return _aten.convolution_backward(gy, x, w, None, stride, padding, [1, 1], False, [0, 0], groups,
                                      [mask[0], mask[1], False])[:2]


class _ConvBackward(torch.autograd.Function):
    """(gx, gw, gb) from gy, differentiable once (its backward is the closed form above)."""

    @staticmethod
    def forward(ctx, gy, x, w, stride, padding, groups, need_x, need_w, need_b):
        ctx.set_materialize_grads(False)  # unused outputs get no zero-filled gradient (no wasted convolution)
        ctx.save_for_backward(gy, x, w)
        ctx.cfg = (stride, padding, groups)
        gx, gw = _backward(gy, x, w, stride, padding, groups, (need_x, need_w))
        gb = gy.sum((0, 2, 3)) if need_b else None
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        gy, x, w = ctx.saved_tensors
        stride, padding, groups = ctx.cfg
        n_gy, n_x, n_w = ctx.needs_input_grad[:3]
        g_gy = g_x = g_w = None
        if n_gy:
            if ggx is not None:
                g_gy = F.conv2d(ggx, w, None, stride, padding, 1, groups)
            if ggw is not None:
                t = F.conv2d(x, ggw, None, stride, padding, 1, groups)
                g_gy = t if g_gy is None else g_gy.add_(t)
            if ggb is not None:
                t = ggb.view(1, -1, 1, 1)
                g_gy = t.expand_as(gy).clone(memory_format=torch.preserve_format) if g_gy is None else g_gy.add_(t)
        if n_x and ggw is not None:
            g_x = _backward(gy, x, ggw, stride, padding, groups, (True, False))[0]
        if n_w and ggx is not None:
            g_w = _backward(gy, ggx, w, stride, padding, groups, (False, True))[1]
        return g_gy, g_x, g_w, None, None, None, None, None, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, groups):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w)
        ctx.cfg = (stride, padding, groups)
        return F.conv2d(x, w, b, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, gy):
        if gy is None:
            return None, None, None, None, None, None
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = _ConvBackward.apply(gy, x, w, *ctx.cfg, need_x, need_w, need_b)
        return gx, gw, gb, None, None, None


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, 1, groups)`` with the double backward above.

    Under autocast (``device.precision=bf16``) the inputs are cast here, where autograd records the
    casts, as autocast casts a convolution's inputs; inside, every order then sees one dtype."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dt = torch.get_autocast_dtype(kind)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(kind, enabled=False):
            return _Conv.apply(x, weight, bias, _pair(stride), _pair(padding), groups)
    return _Conv.apply(x, weight, bias, _pair(stride), _pair(padding), groups)
