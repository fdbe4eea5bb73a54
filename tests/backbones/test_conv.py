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
