"""The fused first layer (conv3x3 + BN + ReLU + max-pool, ops/stem.py) against the unfused torch ops.

The stem op needs the C++ kernels.  Without them (no C++ compiler, a supported set-up, or
``FEWSHOT_OPS_NO_EXT=1``) Conv4's first block falls back to ``F.conv2d`` + ``bn_relu_pool`` on torch ops,
and the same checks run on that fallback: these tests pass on both set-ups and test what the machine runs.
``test_without_the_cpp_kernels_the_fallback_passes_these_tests`` runs them with the kernels turned off, so
every run of the suite covers the set-up without a compiler too.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from fewshot_runner.ops import bn_relu_pool, extension_status, load_extension
from fewshot_runner.ops.stem import conv_bn_relu_pool, conv_bn_relu_pool_reference, stem_applies, stem_fits


@pytest.fixture(scope="module")
def ext_loaded() -> bool:
    return load_extension(warn=False) is not None


def first_layer_fallback(img, weight, conv_bias, bn_weight, bn_bias, eps: float = 1e-5, return_stats: bool = False):
    """What Conv4's first block computes where the stem op cannot run (ConvBlock.forward without the
    C++ kernels): a channels-last convolution, then bn_relu_pool on torch ops."""
    cl = torch.channels_last
    z = F.conv2d(img.to(memory_format=cl), weight.to(memory_format=cl), conv_bias, padding=1)
    return bn_relu_pool(z, bn_weight, bn_bias, eps=eps, backend="torch", return_stats=return_stats)


@pytest.fixture(scope="module")
def first_layer(ext_loaded):
    """The first layer this machine runs: the stem op where the C++ kernels build, else the fallback."""
    return conv_bn_relu_pool if ext_loaded else first_layer_fallback


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
def test_gradcheck_and_gradgradcheck(shape, first_layer):
    img, wt, cb, bw, bb = make(*shape, torch.float64)

    def f(wt, cb, bw, bb):
        return first_layer(img, wt, cb, bw, bb)

    assert gradcheck(f, (wt, cb, bw, bb), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(f, (wt, cb, bw, bb), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape", [(20, 1, 28, 28, 64), (4, 1, 9, 7, 5), (3, 3, 12, 10, 8), (2, 1, 2, 2, 3)])
def test_matches_reference_float64(shape, first_layer):
    img, wt, cb, bw, bb = make(*shape, torch.float64)
    stem = first_layer is conv_bn_relu_pool
    got = orders(first_layer, img, wt, cb, bw, bb)
    ref = orders(conv_bn_relu_pool_reference, img, wt, cb, bw, bb)
    if stem:  # (the torch-ops fallback returns NCHW)
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    names = ["out"] + [f"{o} {p}" for o in ("first", "plain", "second") for p in ("w", "conv b", "bn w", "bn b")]
    for i, (name, a, r) in enumerate(zip(names, got, ref)):
        group = ref[max(1, 4 * ((i - 1) // 4) + 1):4 * ((i - 1) // 4) + 5] if i else ref[:1]
        scale = max(float(t.detach().abs().max()) for t in group)  # float64 sums of terms this large
        if "conv b" in name:  # batch norm removes the conv bias: exactly 0 in the stem op, rounding noise else
            assert float(a.detach().abs().max()) == 0.0 if stem else float(a.detach().abs().max()) < 1e-12 * scale, name
            assert float(r.detach().abs().max()) < 1e-12 * scale, name
        else:
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12 * scale, msg=name)


def test_float32_as_accurate_as_the_unfused_ops(first_layer):
    """fp32, the benchmark's query size: against float64 truth, the fused op's error is no larger than
    the unfused fp32 ops' own (both sum 58,800 values per channel, in different orders)."""
    inputs = make(75, 1, 28, 28, 64, torch.float32)
    truth = orders(conv_bn_relu_pool_reference, *[None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                                                  for t in inputs])
    got = orders(first_layer, *inputs)
    ref = orders(conv_bn_relu_pool_reference, *inputs)
    for i, (a, r, t) in enumerate(zip(got, ref, truth)):
        scale = float(t.detach().abs().max()) + 1e-30
        err_fused = float((a.double() - t).detach().abs().max()) / scale
        err_plain = float((r.double() - t).detach().abs().max()) / scale
        assert err_fused <= max(2 * err_plain, 1e-6), (i, err_fused, err_plain)


def test_no_bias_no_affine(first_layer):
    img, wt, _, _, _ = make(4, 1, 8, 8, 3, torch.float64, bias=False)
    torch.testing.assert_close(first_layer(img, wt, None, None, None),
                               conv_bn_relu_pool_reference(img, wt, None, None, None), rtol=1e-10, atol=1e-10)
    assert gradgradcheck(lambda w: first_layer(img, w, None, None, None), (wt,), eps=1e-6, atol=1e-6)


def test_running_stats_match_batch_norm(first_layer):
    img, wt, cb, bw, bb = make(6, 1, 10, 10, 4, torch.float64)
    out, mean, var = first_layer(img, wt, cb, bw, bb, return_stats=True)
    z = F.conv2d(img, wt, cb, padding=1)
    torch.testing.assert_close(mean, z.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, z.var((0, 2, 3), correction=0), rtol=1e-10, atol=1e-12)


def test_applies_only_to_image_batches_and_only_with_the_kernels(ext_loaded):
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    img = torch.rand(2, 1, 8, 8)
    assert stem_fits(conv) and stem_fits(torch.nn.Conv2d(3, 4, 3, padding=1))
    assert not stem_fits(torch.nn.Conv2d(1, 4, 3, padding=1, stride=2))
    assert not stem_fits(torch.nn.Conv2d(2, 4, 3, padding=1))
    assert not stem_fits(torch.nn.Conv2d(1, 4, 5, padding=2))
    assert stem_applies(img, conv.weight) == ext_loaded  # without the C++ kernels: never (the fallback runs)
    if not ext_loaded:
        with pytest.raises(RuntimeError, match="conv_bn_relu_pool needs the C\\+\\+ kernels"):
            conv_bn_relu_pool(img, conv.weight, conv.bias, None, None)
    assert not stem_applies(img.requires_grad_(), conv.weight)  # needs an input gradient
    assert not stem_applies(torch.rand(2, 1, 8, 8, dtype=torch.float16), conv.weight)
    assert not stem_applies(torch.rand(2, 3, 8, 8), conv.weight)  # channels differ from the weight's


def test_conv4_first_block_uses_it_and_agrees(monkeypatch, ext_loaded):
    """Conv4 (channels-last, fused) runs its first block through the stem op (where the C++ kernels build;
    else never); the net's outputs and second-order MAML gradients equal those with the stem turned off
    (FEWSHOT_OPS_NO_STEM) and those of the unfused net (fused_ops=off)."""
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
    assert len(calls) == (2 if ext_loaded else 0)  # support and query forwards
    monkeypatch.setenv("FEWSHOT_OPS_NO_STEM", "1")
    ref = meta_grad()
    assert len(calls) == (2 if ext_loaded else 0)
    for k, a, r in zip(params, got, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=k)
    unfused = Conv4((1, 28, 28), hidden=8, fused_ops="off").double()
    unfused.load_state_dict(net.state_dict())
    net, params = unfused, dict(unfused.named_parameters())
    for k, a, r in zip(params, got, meta_grad()):
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


def test_without_the_cpp_kernels_the_fallback_passes_these_tests(tmp_path):
    """No C++ compiler is a supported set-up: these tests, run with FEWSHOT_OPS_NO_EXT=1 (the kernels off, as
    without a compiler), test the fallback and pass, none skipped.  (The gradchecks and gradgradchecks are left
    out here, ~50 s: the fallback's pieces, F.conv2d and bn_relu_pool's torch ops, have their own in
    tests/ops/test_bn_relu_pool.py, and its second derivatives are checked against the reference below.)"""
    env = {**os.environ, "FEWSHOT_OPS_NO_EXT": "1"}
    here = Path(__file__)
    p = subprocess.run([sys.executable, "-m", "pytest", str(here), "-q", "-p", "no:cacheprovider", "-m", "not slow",
                        "-k", "not gradcheck and not no_bias and not without_the_cpp_kernels", f"--rootdir={here.parents[2]}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    tail = p.stdout[-3000:] + p.stderr[-2000:]
    assert p.returncode == 0, tail
    summary = p.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail
