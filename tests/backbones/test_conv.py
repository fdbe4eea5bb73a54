"""Conv4 with the fused BN+ReLU+max-pool op behaves as the unfused net: outputs, running
statistics (ProtoNet trains with them and tests in eval mode), and gradients."""

from __future__ import annotations

import pytest
import torch

from fewshot_runner.backbones.conv import Conv4


def twin_nets(pool: bool, momentum):
    torch.manual_seed(0)
    plain = Conv4((1, 28, 28), hidden=8, pool=pool, fused_ops="off").double()
    fused = Conv4((1, 28, 28), hidden=8, pool=pool, fused_ops="on").double()
    fused.load_state_dict(plain.state_dict())
    for net in (plain, fused):
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = momentum
    return plain, fused


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_conv4_updates_running_stats_like_batchnorm(pool, momentum):
    plain, fused = twin_nets(pool, momentum)
    assert fused.blocks[0].fused and not plain.blocks[0].fused
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # train mode: batch statistics, running statistics updated
        x = torch.rand(10, 1, 28, 28, dtype=torch.float64, generator=g) * 2 + 0.5
        a, b = plain(x), fused(x)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for (ka, va), (kb, vb) in zip(plain.state_dict().items(), fused.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(vb, va, rtol=1e-10, atol=1e-12, msg=ka)
    # the running statistics moved away from their initial values
    assert not torch.allclose(fused.blocks[0].bn.running_var, torch.ones(8, dtype=torch.float64))
    assert int(fused.blocks[0].bn.num_batches_tracked) == 3
    plain.eval(), fused.eval()  # eval mode: the running statistics are used
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64, generator=g)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-10, atol=1e-12)


def test_fused_conv4_gradients_match_in_train_mode():
    plain, fused = twin_nets(True, 0.1)
    x = torch.rand(10, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ga = torch.autograd.grad(plain(x).pow(2).sum(), list(plain.parameters()))
    gb = torch.autograd.grad(fused(x).pow(2).sum(), list(fused.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def maml_meta_grad(net, x_s, y_s, x_q, y_q, head):
    """One second-order MAML step on a linear head over ``net``'s features: d(query loss)/d(weights)."""
    import torch.nn.functional as F
    from torch.func import functional_call

    params = dict(net.named_parameters())
    fwd = lambda p, x: functional_call(net, p, (x,)) @ head  # noqa: E731
    loss = F.cross_entropy(fwd(params, x_s), y_s)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    fast = {k: w - 0.4 * g for (k, w), g in zip(params.items(), grads)}
    return torch.autograd.grad(F.cross_entropy(fwd(fast, x_q), y_q), list(params.values()))


@pytest.mark.parametrize("pool", [True, False], ids=["maxpool", "strided"])
@pytest.mark.parametrize("fused_ops", ["on", "off"])
def test_channels_last_conv4_equals_nchw_to_second_order(pool, fused_ops):
    """use_channels_last (device.channels_last): same forward and second-order MAML meta-gradient
    (float64, 1e-10) as the NCHW net, and the maps really are NHWC (the fused op's NHWC kernels run)."""
    from fewshot_runner.backbones import use_channels_last

    torch.manual_seed(0)
    nchw = Conv4((1, 28, 28), hidden=8, pool=pool, fused_ops=fused_ops).double()
    nhwc = Conv4((1, 28, 28), hidden=8, pool=pool, fused_ops=fused_ops).double()
    nhwc.load_state_dict(nchw.state_dict())
    use_channels_last(nhwc)
    assert nhwc.blocks[0].channels_last and not nchw.blocks[0].channels_last
    assert nhwc.blocks[1].conv.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(3)
    x_s, x_q = (torch.rand(n, 1, 28, 28, dtype=torch.float64, generator=g) for n in (5, 15))
    y_s, y_q = torch.arange(5), torch.arange(5).repeat(3)
    head = torch.randn(nchw(x_q).shape[1], 5, dtype=torch.float64, generator=g)
    h = nhwc.blocks[0](x_q)
    assert h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    torch.testing.assert_close(nhwc(x_q), nchw(x_q), rtol=1e-10, atol=1e-12)
    got = maml_meta_grad(nhwc, x_s, y_s, x_q, y_q, head)
    ref = maml_meta_grad(nchw, x_s, y_s, x_q, y_q, head)
    for (name, _), a, b in zip(nchw.named_parameters(), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)



def test_bf16_autocast_runs_the_fused_ops_in_fp32(monkeypatch):
    """device.precision=bf16 with the fused ops: a block's convolution runs in bf16 (AMX) and its
    output is widened, so batch norm + ReLU + max-pool still run as the fp32 fused kernels (not the
    generic path on bf16 maps).  Each block's output and gradients equal that composition written
    out (bf16 conv, then the unfused fp32 ops) on the same input; the stem block stays fp32."""
    import torch.nn.functional as F

    import importlib

    from fewshot_runner.backbones import use_channels_last

    brp = importlib.import_module("fewshot_runner.ops.bn_relu_pool")  # (the package exports the function)
    seen = []
    real = brp._BNReluPool.apply

    def spy(x, weight, bias, eps, pool, backend):
        seen.append((x.dtype, backend))
        return real(x, weight, bias, eps, pool, backend)

    monkeypatch.setattr(brp._BNReluPool, "apply", spy)
    torch.manual_seed(0)
    net = use_channels_last(Conv4((1, 28, 28), hidden=16, pool=True, fused_ops="on"))
    g = torch.Generator().manual_seed(4)
    x = torch.rand(40, 1, 28, 28, generator=g).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    # blocks 2-4 (block 1: the stem), as fp32 maps in the C++ kernels
    assert out.dtype == torch.float32 and seen == [(torch.float32, "ext")] * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h0 = net.blocks[0](x)
    torch.testing.assert_close(h0, net.blocks[0](x), rtol=0, atol=0)  # the stem: fp32 throughout, autocast or not
    for block in net.blocks[1:]:
        h = h0.detach().requires_grad_()
        conv, bn = block.conv, block.bn
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = block(h)
        z = F.conv2d(h.bfloat16(), conv.weight.bfloat16(), conv.bias.bfloat16(), padding=1).float()
        want = F.max_pool2d(F.relu(F.batch_norm(z, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)), 2)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        gp = torch.randn(got.shape, generator=g)
        wrt = (h, conv.weight, conv.bias, bn.weight, bn.bias)
        ga = torch.autograd.grad(got, wrt, gp)
        gb = torch.autograd.grad(want, wrt, gp)
        for name, a, b in zip(("input", "conv.weight", "conv.bias", "bn.weight", "bn.bias"), ga, gb):
            # the same ops in the same precisions: equal but for a rare bf16 rounding flipped by a
            # different fp32 summation order (one flip: 2^-9 of that element)
            # (the conv bias is removed by batch norm: its gradient is rounding noise, measured
            # against the size of the weight gradient)
            scale = (gb[1] if name == "conv.bias" else b).float().norm()
            err = ((a.float() - b.float()).norm() / scale).item()
            assert err <= 1e-3, (name, err)
        h0 = got.detach()


def test_bf16_autocast_second_order_maml_runs_through_the_stem(monkeypatch):
    """MAML's inner backward runs inside the autocast region: the stem's differentiable backward
    recomputes its map in fp32 (it failed on a bf16 map).  bf16 second-order meta-gradients are far
    from exact on this ReLU / max-pool net (~0.3-0.4 relative, with or without the stem, against
    fp32's 1e-6): the stem's must be no worse than the unfused ops' under the same autocast."""
    from fewshot_runner.backbones import use_channels_last

    torch.manual_seed(0)
    net = use_channels_last(Conv4((1, 28, 28), hidden=16, pool=True, fused_ops="on"))
    assert net.blocks[0].stem
    g = torch.Generator().manual_seed(6)
    x_s, x_q = (torch.rand(n, 1, 28, 28, generator=g).to(memory_format=torch.channels_last) for n in (5, 15))
    y_s, y_q = torch.arange(5), torch.arange(5).repeat(3)
    head = torch.randn(16, 5, generator=g)
    names = [n for n, _ in net.named_parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stem = maml_meta_grad(net, x_s, y_s, x_q, y_q, head)
        monkeypatch.setenv("FEWSHOT_OPS_NO_STEM", "1")
        plain = maml_meta_grad(net, x_s, y_s, x_q, y_q, head)
    monkeypatch.delenv("FEWSHOT_OPS_NO_STEM")
    ref = maml_meta_grad(net.double(), x_s.double(), y_s, x_q.double(), y_q, head.double())
    keep = [i for i, n in enumerate(names) if not n.endswith("conv.bias")]  # (exactly 0: no relative error)

    def rel_err(grads):
        diff = torch.cat([(grads[i].double() - ref[i]).flatten() for i in keep])
        return (diff.norm() / torch.cat([ref[i].flatten() for i in keep]).norm()).item()

    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in stem)
    assert rel_err(stem) <= 1.25 * rel_err(plain), (rel_err(stem), rel_err(plain))
