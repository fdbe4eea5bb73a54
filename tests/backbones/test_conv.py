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
