"""The fused BN + ReLU + max-pool op: exact first and second derivatives, against the unfused torch ops."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from fewshot_runner.ops import bn_relu_pool, bn_relu_pool_reference, extension_status, load_extension

MOD = importlib.import_module("fewshot_runner.ops.bn_relu_pool")  # the module (the package exports the function)


@pytest.fixture(scope="module")
def ext_loaded() -> bool:
    return load_extension(warn=False) is not None


@pytest.fixture(params=["ext", "torch"])
def backend(request, ext_loaded) -> str:
    if request.param == "ext" and not ext_loaded:
        pytest.skip(f"C++ kernels unavailable: {extension_status()['error']}")
    return request.param


def fused(backend):
    return lambda x, w, b, pool=True, eps=1e-5: bn_relu_pool(x, w, b, eps=eps, pool=pool, backend=backend)


def make_inputs(shape, dtype, seed=0, offset=0.3, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, generator=g) * 1.5 + offset
    if channels_last:  # the NHWC kernels (what oneDNN's channels-last convolutions hand over)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(shape[1], dtype=dtype, generator=g) + 0.5).requires_grad_()
    b = (torch.randn(shape[1], dtype=dtype, generator=g) * 0.2).requires_grad_()
    return x, w, b


def all_orders(op, x, w, b, pool, seed=1):
    """forward, first-order grads (x, w, b), and grads of a loss of those (x, w, b, grad_output)."""
    out = op(x, w, b, pool=pool)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, dtype=x.dtype, generator=g).requires_grad_()
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), gout, create_graph=True)
    rx = torch.randn(x.shape, dtype=x.dtype, generator=g)
    loss = (gx * rx).sum() + (gw * gw).sum() + (gb * torch.arange(len(gb), dtype=x.dtype)).sum() + (gx * gx).mean()
    second = torch.autograd.grad(loss, (x, w, b, gout), allow_unused=True)
    second = [torch.zeros_like(t) if s is None else s for s, t in zip(second, (x, w, b, gout))]
    return [out, gx, gw, gb, *second]


# ------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("shape", [(3, 2, 6, 6), (3, 2, 7, 5)])
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_and_gradgradcheck(backend, shape, pool, channels_last):
    x, w, b = make_inputs(shape, torch.float64, seed=3, channels_last=channels_last)
    op = fused(backend)

    def f(x, w, b):
        return op(x, w, b, pool=pool)

    assert gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("shape", [(20, 8, 14, 14), (4, 3, 7, 5), (2, 3, 9, 35), (3, 64, 5, 5)])
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference_float64(backend, shape, pool, channels_last):
    x, w, b = make_inputs(shape, torch.float64, channels_last=channels_last)
    got = all_orders(fused(backend), x, w, b, pool)
    ref = all_orders(bn_relu_pool_reference, x, w, b, pool)
    names = ["out", "gx", "gw", "gb", "ggx", "ggw", "ggb", "ggout"]
    for name, a, r in zip(names, got, ref):
        assert a.shape == r.shape, name
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=name)
    if channels_last and backend == "ext":  # outputs and gradients stay in x's layout (no copies)
        for name, a in zip(names[:2], got[:2]):
            assert a.is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference_float32(backend, pool, channels_last):
    x, w, b = make_inputs((20, 8, 14, 14), torch.float32, channels_last=channels_last)
    got = all_orders(fused(backend), x, w, b, pool)
    ref = all_orders(bn_relu_pool_reference, x, w, b, pool)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert a.dtype == torch.float32
        err = ((a - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-5, (i, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 3, 28, 28), (2, 2, 9, 66)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_ties_follow_max_pool(backend, dtype, shape, channels_last):
    """Integer inputs give many exact ties: the gradient must go where F.max_pool2d sends it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, shape, generator=g).to(dtype).requires_grad_()
    # the op on x in the layout under test; the reference on plain NCHW x (torch's own channels-last
    # batch norm sums in another order: 4e-4 off float64 here, 30x further than either NCHW result)
    xt = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_() if channels_last else x
    w = (torch.rand(shape[1], dtype=dtype, generator=g) + 0.5).requires_grad_()
    b = (torch.randn(shape[1], dtype=dtype, generator=g) * 0.1).requires_grad_()
    res = []
    for op, x in ((fused(backend), xt), (bn_relu_pool_reference, x)):
        out = op(x, w, b)
        gout = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        res.append((out, *torch.autograd.grad(out, (x, w, b), gout)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, r in zip(*res):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)


def test_no_affine_and_noncontiguous(backend):
    x, _, _ = make_inputs((6, 4, 10, 10), torch.float64)
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    a = fused(backend)(xc, None, None)
    r = bn_relu_pool_reference(x, None, None)
    torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    gout = torch.randn_like(r)
    torch.testing.assert_close(torch.autograd.grad(a, xc, gout)[0], torch.autograd.grad(r, x, gout)[0],
                               rtol=1e-10, atol=1e-10)
    assert gradgradcheck(lambda t: fused(backend)(t, None, None), (make_inputs((2, 2, 4, 6), torch.float64)[0],))


# ------------------------------------------------------------------------------ MAML check
def tiny_net(params, x, op):
    h = F.conv2d(x, params["c1.w"], params["c1.b"], padding=1)
    h = op(h, params["bn1.w"], params["bn1.b"], pool=True)
    h = F.conv2d(h, params["c2.w"], params["c2.b"], padding=1)
    h = op(h, params["bn2.w"], params["bn2.b"], pool=False)
    h = F.conv2d(h, params["c3.w"], params["c3.b"], padding=1)
    h = op(h, params["bn3.w"], params["bn3.b"], pool=True)
    return h.flatten(1) @ params["fc.w"].t() + params["fc.b"]


def meta_gradient(op, params, xs, ys, xq, yq, lr=0.4):
    loss = F.cross_entropy(tiny_net(params, xs, op), ys)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    fast = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    return torch.autograd.grad(F.cross_entropy(tiny_net(fast, xq, op), yq), list(params.values()))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_maml_meta_gradient_float64(backend, channels_last):
    g = torch.Generator().manual_seed(0)
    d = torch.float64
    c = 6
    shapes = {"c1.w": (c, 1, 3, 3), "c1.b": (c,), "bn1.w": (c,), "bn1.b": (c,), "c2.w": (c, c, 3, 3), "c2.b": (c,),
              "bn2.w": (c,), "bn2.b": (c,), "c3.w": (c, c, 3, 3), "c3.b": (c,), "bn3.w": (c,), "bn3.b": (c,),
              "fc.w": (5, c * 3 * 3), "fc.b": (5,)}
    params = {k: (torch.randn(s, dtype=d, generator=g) * (0.3 if len(s) > 1 else 0.1)
                  + (1.0 if k.startswith("bn") and k.endswith(".w") else 0.0)).requires_grad_()
              for k, s in shapes.items()}
    xs, ys = torch.randn(5, 1, 12, 12, dtype=d, generator=g), torch.arange(5)
    xq, yq = torch.randn(15, 1, 12, 12, dtype=d, generator=g), torch.arange(5).repeat(3)
    if channels_last:  # inputs and conv weights channels-last: the convolutions hand NHWC maps to the op
        xs, xq = (t.contiguous(memory_format=torch.channels_last) for t in (xs, xq))
        params = {k: (p.detach().contiguous(memory_format=torch.channels_last).requires_grad_() if p.dim() == 4 else p)
                  for k, p in params.items()}
    got = meta_gradient(fused(backend), params, xs, ys, xq, yq)
    ref = meta_gradient(bn_relu_pool_reference, params, xs, ys, xq, yq)
    for k, a, r in zip(params, got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=k)
    # conv biases before a batch norm in training mode get exactly no meta-gradient
    for k in ("c1.b", "c2.b", "c3.b"):
        assert got[list(params).index(k)].abs().max() < 1e-10


def test_torch_func_grad_and_vmap():
    """Under torch.func transforms the op runs its torch-ops backend; second order still exact."""
    from torch.func import grad, vmap

    d = torch.float64
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(3, 6, 3, 8, 8, dtype=d, generator=g)
    w = torch.rand(3, dtype=d, generator=g) + 0.5
    b = torch.randn(3, dtype=d, generator=g) * 0.1
    r = torch.linspace(-1, 1, 16, dtype=d).view(1, 1, 4, 4)

    def outer(w, b, x, op):
        gw, gb = grad(lambda w, b: (op(x, w, b) ** 2).sum(), argnums=(0, 1))(w, b)
        return (op(x, w - 0.1 * gw, b - 0.1 * gb) * r).sum()

    got = vmap(grad(outer, argnums=(0, 1)), in_dims=(None, None, 0, None))(w, b, xb, bn_relu_pool)
    for i in range(3):
        ref = torch.autograd.functional.jacobian(lambda w, b: outer(w, b, xb[i], bn_relu_pool_reference), (w, b))
        torch.testing.assert_close(got[0][i], ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1][i], ref[1], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------- API and fallback
def test_backends_agree_and_dispatch(ext_loaded):
    x, w, b = make_inputs((5, 4, 12, 12), torch.float32)
    expected = "ext" if ext_loaded else "torch"
    assert MOD._backend(x, w, b) == expected
    assert MOD._backend(x.double(), w, b) == "torch"  # mixed dtypes: torch ops decide
    assert MOD._backend(x.half(), None, None) == "torch"
    a = bn_relu_pool(x, w, b)
    t = bn_relu_pool(x, w, b, backend="torch")
    torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        bn_relu_pool(x, w, b, backend="nope")
    with pytest.raises(ValueError):
        bn_relu_pool(x[0], w, b)
    with pytest.raises(ValueError):
        bn_relu_pool(x, w[:2], b)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(MOD, "_ext", None)
    monkeypatch.setattr(MOD, "_ext_tried", False)
    monkeypatch.setattr(MOD, "_ext_error", None)
    monkeypatch.setenv("CXX", "no-such-compiler-fewshot")
    monkeypatch.delenv("FEWSHOT_OPS_NO_EXT", raising=False)
    x, w, b = make_inputs((3, 2, 6, 6), torch.float64)
    with pytest.warns(RuntimeWarning, match="torch-ops implementation"):
        out = bn_relu_pool(x, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = bn_relu_pool(x, w, b)  # no second warning
    assert MOD._backend(x, w, b) == "torch"
    assert "compiler" in extension_status()["error"]
    torch.testing.assert_close(out, bn_relu_pool_reference(x, w, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, out2)
    with pytest.raises(RuntimeError, match="C.. kernels"):
        bn_relu_pool(x, w, b, backend="ext")


def test_third_order_is_refused(backend):
    x, w, b = make_inputs((2, 2, 4, 4), torch.float64)
    out = fused(backend)(x, w, b)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad((gx ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(ggx.sum(), x)


@pytest.mark.gpu
def test_cuda_uses_torch_ops_and_matches():
    x, w, b = (t.detach().cuda().requires_grad_() for t in make_inputs((6, 4, 10, 10), torch.float64))
    got = all_orders(lambda *a, **k: bn_relu_pool(*a, **k), x, w, b, True)
    ref = all_orders(bn_relu_pool_reference, x, w, b, True)
    for a, r in zip(got, ref):
        assert a.is_cuda
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
