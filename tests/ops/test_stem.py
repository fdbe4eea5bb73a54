"""The fused first layer (conv3x3 + BN + ReLU + max-pool, ops/stem.py) against the unfused torch ops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from fewshot_runner.ops import extension_status, load_extension
from fewshot_runner.ops.stem import conv_bn_relu_pool, conv_bn_relu_pool_reference, stem_applies, stem_fits


@pytest.fixture(scope="module", autouse=True)
def ext_loaded():
    if load_extension(warn=False) is None:
        pytest.fail(f"C++ kernels unavailable: {extension_status()['error']}")


def make(n, cin, h, w, c, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, cin, h, w, dtype=dtype, generator=g)  # images in [0, 1], as the datasets give
    img[:, :, ::3] = 0.0  # blank rows: zero patches and ReLU-dead windows occur
    wt = (torch.randn(c, cin, 3, 3, dtype=dtype, generator=g) * 0.5).requires_grad_()
    cb = (torch.randn(c, dtype=dtype, generator=g) * 0.3).requires_grad_() if bias else None
    bw = (torch.rand(c, dtype=dtype, generator=g) + 0.5).requires_grad_()
    bb = (torch.randn(c, dtype=dtype, generator=g) * 0.2).requires_grad_()
    return img, wt, cb, bw, bb


def orders(op, img, wt, cb, bw, bb, seed=1):
    """forward, the first-order gradients (weight, conv bias, BN weight, BN bias) of a random linear
    loss, and the gradients of a loss of those gradients (second order, as MAML's meta-gradient)."""
    params = [t for t in (wt, cb, bw, bb) if t is not None]
    out = op(img, wt, cb, bw, bb)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, dtype=img.dtype, generator=g)
    first = torch.autograd.grad(out, params, gout, create_graph=True)
    loss = sum((f * torch.randn(f.shape, dtype=img.dtype, generator=g)).sum() + (f * f).sum() for f in first)
    second = torch.autograd.grad(loss, params, allow_unused=True)
    second = [torch.zeros_like(p) if s is None else s for s, p in zip(second, params)]
    plain = torch.autograd.grad(op(img, wt, cb, bw, bb), params, gout)  # the first-order (C++) backward
    return [out, *first, *plain, *second]


@pytest.mark.parametrize("shape", [(3, 1, 6, 6, 4), (2, 1, 7, 5, 3), (2, 3, 6, 4, 2)])
def test_gradcheck_and_gradgradcheck(shape):
    img, wt, cb, bw, bb = make(*shape, torch.float64)

    def f(wt, cb, bw, bb):
        return conv_bn_relu_pool(img, wt, cb, bw, bb)

    assert gradcheck(f, (wt, cb, bw, bb), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(f, (wt, cb, bw, bb), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape", [(20, 1, 28, 28, 64), (4, 1, 9, 7, 5), (3, 3, 12, 10, 8), (2, 1, 2, 2, 3)])
def test_matches_reference_float64(shape):
    img, wt, cb, bw, bb = make(*shape, torch.float64)
    got = orders(conv_bn_relu_pool, img, wt, cb, bw, bb)
    ref = orders(conv_bn_relu_pool_reference, img, wt, cb, bw, bb)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    names = ["out"] + [f"{o} {p}" for o in ("first", "plain", "second") for p in ("w", "conv b", "bn w", "bn b")]
    for i, (name, a, r) in enumerate(zip(names, got, ref)):
        group = ref[max(1, 4 * ((i - 1) // 4) + 1):4 * ((i - 1) // 4) + 5] if i else ref[:1]
        scale = max(float(t.detach().abs().max()) for t in group)  # float64 sums of terms this large
        if "conv b" in name:  # batch norm removes the conv bias: exactly 0 here, rounding noise there
            assert float(a.detach().abs().max()) == 0.0, name
            assert float(r.detach().abs().max()) < 1e-12 * scale, name
        else:
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12 * scale, msg=name)


def test_float32_as_accurate_as_the_unfused_ops():
    """fp32, the benchmark's query size: against float64 truth, the fused op's error is no larger than
    the unfused fp32 ops' own (both sum 58,800 values per channel, in different orders)."""
    inputs = make(75, 1, 28, 28, 64, torch.float32)
    truth = orders(conv_bn_relu_pool_reference, *[None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                                                  for t in inputs])
    got = orders(conv_bn_relu_pool, *inputs)
    ref = orders(conv_bn_relu_pool_reference, *inputs)
    for i, (a, r, t) in enumerate(zip(got, ref, truth)):
        scale = float(t.detach().abs().max()) + 1e-30
        err_fused = float((a.double() - t).detach().abs().max()) / scale
        err_plain = float((r.double() - t).detach().abs().max()) / scale
        assert err_fused <= max(2 * err_plain, 1e-6), (i, err_fused, err_plain)


def test_no_bias_no_affine():
    img, wt, _, _, _ = make(4, 1, 8, 8, 3, torch.float64, bias=False)
    torch.testing.assert_close(conv_bn_relu_pool(img, wt, None, None, None),
                               conv_bn_relu_pool_reference(img, wt, None, None, None), rtol=1e-10, atol=1e-10)
    assert gradgradcheck(lambda w: conv_bn_relu_pool(img, w, None, None, None), (wt,), eps=1e-6, atol=1e-6)


def test_running_stats_match_batch_norm():
    img, wt, cb, bw, bb = make(6, 1, 10, 10, 4, torch.float64)
    out, mean, var = conv_bn_relu_pool(img, wt, cb, bw, bb, return_stats=True)
    z = F.conv2d(img, wt, cb, padding=1)
    torch.testing.assert_close(mean, z.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, z.var((0, 2, 3), correction=0), rtol=1e-10, atol=1e-12)


def test_applies_only_to_image_batches():
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    img = torch.rand(2, 1, 8, 8)
    assert stem_fits(conv) and stem_fits(torch.nn.Conv2d(3, 4, 3, padding=1))
    assert not stem_fits(torch.nn.Conv2d(1, 4, 3, padding=1, stride=2))
    assert not stem_fits(torch.nn.Conv2d(2, 4, 3, padding=1))
    assert not stem_fits(torch.nn.Conv2d(1, 4, 5, padding=2))
    assert stem_applies(img, conv.weight)
    assert not stem_applies(img.requires_grad_(), conv.weight)  # needs an input gradient
    assert not stem_applies(torch.rand(2, 1, 8, 8, dtype=torch.float16), conv.weight)
    assert not stem_applies(torch.rand(2, 3, 8, 8), conv.weight)  # channels differ from the weight's


def test_conv4_first_block_uses_it_and_agrees(monkeypatch):
    """Conv4 (channels-last, fused) runs its first block through the stem op; the net's outputs and
    second-order MAML gradients equal those with the stem turned off (FEWSHOT_OPS_NO_STEM)."""
    from fewshot_runner.backbones import use_channels_last
    from fewshot_runner.backbones.conv import Conv4
    from fewshot_runner.ops import stem

    torch.manual_seed(0)
    net = Conv4((1, 28, 28), hidden=8, fused_ops="on").double()
    use_channels_last(net)
    calls = []
    real = stem._Stem.apply
    monkeypatch.setattr(stem._Stem, "apply", lambda *a: calls.append(1) or real(*a))
    params = dict(net.named_parameters())
    xs, xq = torch.rand(5, 1, 28, 28, dtype=torch.float64), torch.rand(10, 1, 28, 28, dtype=torch.float64)
    head = torch.randn(5, 8, dtype=torch.float64)

    def meta_grad():
        loss = F.cross_entropy(torch.func.functional_call(net, params, (xs,)) @ head.t(), torch.arange(5))
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {k: p - 0.4 * g for (k, p), g in zip(params.items(), grads)}
        out = torch.func.functional_call(net, fast, (xq,)) @ head.t()
        return torch.autograd.grad(F.cross_entropy(out, torch.arange(5).repeat(2)), list(params.values()))

    got = meta_grad()
    assert len(calls) == 2  # support and query forwards
    monkeypatch.setenv("FEWSHOT_OPS_NO_STEM", "1")
    ref = meta_grad()
    assert len(calls) == 2
    for k, a, r in zip(params, got, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=k)
    # running statistics (ProtoNet-style training mode) are kept as nn.BatchNorm2d keeps them
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    for m in (a, b):
        for bn in [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]:
            bn.track_running_stats = True
    a.train(), b.train()
    monkeypatch.delenv("FEWSHOT_OPS_NO_STEM")
    a(xq)
    monkeypatch.setenv("FEWSHOT_OPS_NO_STEM", "1")
    b(xq)
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12, msg=k)
