"""A conv net's first layer as one op: conv3x3 (1 or 3 input channels) -> batch norm -> ReLU -> max-pool.

``conv_bn_relu_pool(img, weight, conv_bias, bn_weight, bn_bias, eps)`` equals
``bn_relu_pool(F.conv2d(img, weight, conv_bias, padding=1), bn_weight, bn_bias, eps)`` (batch
statistics, 2x2 max-pool), with exact first and second derivatives with respect to the weights.

Why: the first layer's 64-channel map is 64x the size of a 1-channel image; oneDNN writes it, batch
norm reads it twice and the weight gradient reads its gradient again, all memory-bound (on the MAML
benchmark's 75 x 64 x 28 x 28 query maps, ~20 % of a step).  The C++ kernels
(``csrc/conv_bn_relu_pool.inc``) never store it: the batch statistics come from the images' 9 x 9
patch Gram matrix, the forward recomputes the map per pooled window, and the first-order backward
needs only pooled-size passes (the math is in the .inc file).

The backward is first-order in C++.  When it has to be differentiable itself (``create_graph=True``:
the inner step of second-order MAML), it is composed of differentiable pieces instead: the map is
recomputed by ``F.conv2d``, then ``bn_relu_pool``'s backward Function (with its closed-form double
backward) and the convolution's weight gradient.  The images get no gradient (they are data), and
the convolution bias, which batch norm removes exactly, gets an exact zero.

Used by ``ConvBlock`` for the first block of Conv4 when the fused kernels, channels-last and batch
statistics are on and the input is a batch of images that needs no gradient (``stem_fits``,
``stem_applies``).
``FEWSHOT_OPS_NO_STEM=1`` turns it off (for A/B timings).
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from fewshot_runner.ops.functorch import is_transformed
_brp = importlib.import_module("fewshot_runner.ops.bn_relu_pool")  # the module (the package exports the function)

__all__ = ["conv_bn_relu_pool", "conv_bn_relu_pool_reference", "stem_applies", "stem_fits"]


def conv_bn_relu_pool_reference(img, weight, conv_bias, bn_weight, bn_bias, eps: float = 1e-5) -> torch.Tensor:
    """The unfused torch ops (for tests and benchmarks)."""
    return _brp.bn_relu_pool_reference(F.conv2d(img, weight, conv_bias, padding=1), bn_weight, bn_bias, eps)


def stem_fits(conv: torch.nn.Conv2d) -> bool:
    """Whether a convolution has the shape the stem op computes (fixed at construction)."""
    return (conv.in_channels in (1, 3) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def stem_applies(img: torch.Tensor, weight: torch.Tensor, tensors=()) -> bool:
    """Whether ``conv_bn_relu_pool`` can run on these tensors (a conv that ``stem_fits``; else the
    caller takes the usual path): CPU float images that need no gradient, plain tensors."""
    if os.environ.get("FEWSHOT_OPS_NO_STEM", "") not in ("", "0"):
        return False
    if img.device.type != "cpu" or img.dtype not in (torch.float32, torch.float64) or img.dim() != 4:
        return False
    if img.requires_grad or img.shape[1] != weight.shape[1] or img.shape[2] < 2 or img.shape[3] < 2:
        return False
    for t in (img, weight, *tensors):
        if t is not None and (is_transformed(t) or t.dtype != img.dtype or t.device != img.device):
            return False
    return _brp.load_extension() is not None


class _Stem(torch.autograd.Function):
    @staticmethod
    def forward(img, weight, conv_bias, bn_weight, bn_bias, eps):
        return tuple(_brp._ext.stem_forward(img, weight, bn_weight, bn_bias, eps))  # out, mean, rstd, idx, xsel, cov, s

    @staticmethod
    def setup_context(ctx, inputs, output):
        img, weight, conv_bias, bn_weight, bn_bias, eps = inputs
        _, mean, rstd, idx, xsel, cov, s = output
        ctx.mark_non_differentiable(mean, rstd, idx, xsel, cov, s)
        ctx.save_for_backward(img, weight, bn_weight, mean, rstd, idx, xsel, cov, s)
        ctx.has_conv_bias = conv_bias is not None
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gout, *_):
        need = ctx.needs_input_grad
        if gout is None:
            return (None,) * 6
        img, weight, bn_weight, mean, rstd, idx, xsel, cov, s = ctx.saved_tensors
        gout = gout.contiguous(memory_format=torch.channels_last)
        if torch.is_grad_enabled():  # create_graph: a backward that is differentiable again
            # all NHWC (as ConvBlock hands tensors to oneDNN), else oneDNN copies the full-size maps
            # (in the forward's precision: under bf16 autocast, MAML's inner backward runs inside the
            # autocast region, and the stem is fp32 throughout)
            cl = torch.channels_last
            img_cl, w_cl = img.to(memory_format=cl), weight.to(memory_format=cl)
            with torch.autocast(img.device.type, enabled=False):
                z = F.conv2d(img_cl, w_cl, None, padding=1).contiguous(memory_format=cl)
                gz, g_bw, g_bb = _brp._BNReluPoolBackward.apply(gout, z, bn_weight, mean, rstd, True, "ext", idx, xsel)
                g_w = torch.ops.aten.convolution_backward(gz, img_cl, w_cl.detach(), None, [1, 1], [1, 1], [1, 1],
                                                          False, [0, 0], 1, [False, True, False])[1] if need[1] else None
        else:
            g_w, g_bw, g_bb = _brp._ext.stem_backward(gout, img, weight, bn_weight, mean, rstd, idx, xsel,
                                                      cov, s)
        g_cb = torch.zeros_like(mean) if ctx.has_conv_bias and need[2] else None
        return (None, g_w if need[1] else None, g_cb, g_bw if need[3] else None, g_bb if need[4] else None, None)


def conv_bn_relu_pool(img: torch.Tensor, weight: torch.Tensor, conv_bias: torch.Tensor | None,
                      bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None, eps: float = 1e-5,
                      return_stats: bool = False):
    """``max_pool2d(relu(batch_norm(conv2d(img, weight, conv_bias, padding=1), training=True)), 2)``.

    img: (N, 1 or 3, H, W), no gradient; weight: (C, CIN, 3, 3).  Output channels-last (N, C, H/2, W/2).
    return_stats=True also returns the batch mean (with the conv bias) and biased variance, detached.
    Call only where ``stem_applies``.
    """
    if _brp.load_extension() is None:
        raise RuntimeError(f"conv_bn_relu_pool needs the C++ kernels ({_brp.extension_status()['error']})")
    img = img.contiguous()
    out, mean, rstd, *_ = _Stem.apply(img, weight.contiguous(), conv_bias,
                                      None if bn_weight is None else bn_weight.contiguous(),
                                      None if bn_bias is None else bn_bias.contiguous(), float(eps))
    if not return_stats:
        return out
    mean = mean.detach() if conv_bias is None else mean.detach() + conv_bias.detach()
    return out, mean, _brp.batch_variance(rstd, eps)
