"""ops.conv.conv2d: F.conv2d with a double backward that runs grouped convolutions whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fewshot_runner.ops.conv import conv2d

CASES = [  # (N, C_in, C_out, H, stride, padding, groups, bias)
    (3, 4, 6, 7, 2, 1, 2, True),    # grouped, stride 2 on an odd size (7 -> 4), as the MAML Omniglot net
    (2, 3, 4, 6, 1, 1, 1, False),   # plain 3x3, same size
    (2, 6, 6, 5, 2, 1, 3, True),    # one input channel pair per group
    (2, 3, 6, 8, 1, 0, 3, True),    # no padding
]


def _inputs(case, dtype=torch.float64, channels_last=False):
    n, cin, cout, h, _, _, g, bias = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, h, dtype=dtype, generator=gen)
    w = torch.randn(cout, cin // g, 3, 3, dtype=dtype, generator=gen)
    b = torch.randn(cout, dtype=dtype, generator=gen) if bias else None
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    return [t.requires_grad_() if t is not None else None for t in (x, w, b)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_and_gradgradcheck_in_float64(case, channels_last):
    _, _, _, _, s, p, g, bias = case
    x, w, b = _inputs(case, channels_last=channels_last)
    ins = (x, w, b) if bias else (x, w)

    def f(*a):
        return conv2d(a[0], a[1], a[2] if bias else None, s, p, g)

    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradgradcheck(f, ins)


@pytest.mark.parametrize("case", CASES)
def test_second_order_objective_equals_torch_native(case):
    """A MAML-shaped objective (an inner gradient step on w and x, then a loss of the updated
    tensors), differentiated end to end: the same value and gradients as with F.conv2d, 1e-10."""
    _, _, _, _, s, p, g, bias = case

    def objective(conv):
        x, w, b = _inputs(case)
        y = conv(x, w, b, s, p, g)
        inner = (y.tanh() ** 2).sum()
        gx, gw, *gb = torch.autograd.grad(inner, [t for t in (x, w, b) if t is not None], create_graph=True)
        w2, x2 = w - 0.3 * gw, x - 0.2 * gx
        out = conv(x2, w2, b - 0.1 * gb[0] if bias else None, s, p, g).sin().sum()
        return out, torch.autograd.grad(out, [t for t in (x, w, b) if t is not None])

    def native(x, w, b, s_, p_, g_):
        return F.conv2d(x, w, b, s_, p_, 1, g_)

    ours, ours_g = objective(conv2d)
    ref, ref_g = objective(native)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for a, r in zip(ours_g, ref_g):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_double_backward_runs_each_grouped_term_as_one_call():
    """The reason for the op: torch's own double backward of a grouped convolution runs one
    convolution per group for the weight term; this one runs each term as one call."""

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("convolution", "_convolution", "mkldnn_convolution")):
                self.n += 1
            return func(*args, **(kwargs or {}))

    def calls(conv, groups):
        x = torch.randn(2, 4 * groups, 6, 6, requires_grad=True)
        w = torch.randn(4 * groups, 4, 3, 3, requires_grad=True)
        y = conv(x, w, None, 1, 1, groups)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
        loss = gx.square().sum() + gw.square().sum()
        with Count() as c:
            torch.autograd.grad(loss, (x, w))
        return c.n

    ours = calls(conv2d, 8)
    assert ours == calls(conv2d, 1) <= 6  # independent of the group count
    assert calls(lambda x, w, b, s, p, g: F.conv2d(x, w, b, s, p, 1, g), 8) > ours


def test_unused_outputs_cost_no_convolution():
    """Only the images' convolution in MAML's first layer: no gradient for x is computed at all."""
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    (gw,) = torch.autograd.grad(conv2d(x, w, None, 1, 1).sum(), (w,), create_graph=True)
    (ref,) = torch.autograd.grad(F.conv2d(x, w, None, 1, 1).sum(), (w,))
    torch.testing.assert_close(gw, ref)
    assert gw.requires_grad  # the weight gradient's graph is kept for the outer step


def test_second_order_under_bf16_autocast_equals_torch_native():
    """device.precision=bf16: autocast casts the inputs (a cast autograd records), and every order
    of the op then runs in bf16, as torch's own convolution does under autocast (a mixed-dtype
    backward used to fail in oneDNN, on MAML's grouped path)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 7, 7, generator=gen).requires_grad_()
    w = torch.randn(8, 4, 3, 3, generator=gen).requires_grad_()

    def objective(conv):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x, w, None, 2, 1, 2)
            (gw,) = torch.autograd.grad(y.float().square().sum(), (w,), create_graph=True)
            out = conv(x, w - 0.01 * gw, None, 2, 1, 2).float().sum()
        return out, torch.autograd.grad(out, (x, w))

    ours, ours_g = objective(conv2d)
    ref, ref_g = objective(lambda *a: F.conv2d(a[0], a[1], a[2], a[3], a[4], 1, a[5]))
    assert ours.dtype == torch.float32 and all(g.dtype == torch.float32 for g in ours_g)
    rel = [((a - r).norm() / r.norm()).item() for a, r in zip((ours, *ours_g), (ref, *ref_g))]
    assert max(rel) < 1e-2, rel  # the same bf16 arithmetic; bf16 rounding of differently ordered sums only


def test_conv4_grouped_path_uses_the_op_unless_turned_off(monkeypatch):
    """forward_tasks runs ops/conv.py's convolution where the fused ops are on; FEWSHOT_OPS_NO_CONV=1
    (read when the net is built) gives torch's, as docs/speed.md's A/B timing used it."""
    from fewshot_runner.backbones.conv import Conv4

    assert all(b.grouped_conv_op for b in Conv4((1, 16, 16), hidden=4, fused_ops="on").blocks)
    assert not any(b.grouped_conv_op for b in Conv4((1, 16, 16), hidden=4, fused_ops="off").blocks)
    monkeypatch.setenv("FEWSHOT_OPS_NO_CONV", "1")
    assert not any(b.grouped_conv_op for b in Conv4((1, 16, 16), hidden=4, fused_ops="on").blocks)
