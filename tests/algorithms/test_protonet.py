import pytest
import torch
from torch import nn

from fewshot_runner.algorithms.protonet import PrototypicalNetworks
from fewshot_runner.episode import Episode


def test_protonet_logits_equal_hand_computation():
    g = torch.Generator().manual_seed(0)
    n_way, n_shot, n_query, d = 3, 2, 4, 5
    xs = torch.randn(1, n_way * n_shot, d, generator=g, dtype=torch.float64)
    xq = torch.randn(1, n_way * n_query, d, generator=g, dtype=torch.float64)
    ys = torch.tensor([[2, 0, 1, 1, 0, 2]])
    yq = torch.arange(n_way).repeat_interleave(n_query).unsqueeze(0)
    net = PrototypicalNetworks(nn.Identity(), n_way, d)
    logits = net.predict(Episode(xs, ys, xq, yq, n_way))[0]
    for q in range(n_way * n_query):
        for c in range(n_way):
            proto = sum(xs[0, i] for i in range(6) if ys[0, i] == c) / n_shot
            expected = -sum((xq[0, q, j] - proto[j]) ** 2 for j in range(d))
            assert abs(logits[q, c].item() - expected.item()) < 1e-12


def test_protonet_loss_is_cross_entropy_and_any_way_works():
    net = PrototypicalNetworks(nn.Flatten(), 5, 4)
    ep = Episode(torch.randn(2, 20 * 1, 4), torch.arange(20).repeat(2, 1), torch.randn(2, 40, 4),
                 torch.arange(20).repeat_interleave(2).repeat(2, 1), 20)
    loss, metrics = net.meta_loss(ep)
    logits = net.predict(ep)
    assert logits.shape == (2, 40, 20)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 20), ep.query_y.reshape(-1)))
    assert 0.0 <= metrics["acc"].item() <= 1.0


@pytest.mark.slow
def test_compiled_protonet_gives_the_same_logits_and_state_dict_keys():
    """device.compile=true: torch.compile of the backbone (about 30 s to compile on a CPU)."""
    from fewshot_runner.backbones.conv import Conv4

    torch.manual_seed(0)
    a = PrototypicalNetworks(Conv4((1, 28, 28), hidden=8, fused_ops="off"), n_way=5, feature_dim=8)
    b = PrototypicalNetworks(Conv4((1, 28, 28), hidden=8, fused_ops="off"), n_way=5, feature_dim=8)
    b.load_state_dict(a.state_dict())
    b.compile_for_speed()
    assert list(a.state_dict()) == list(b.state_dict())
    g = torch.Generator().manual_seed(1)
    ep = Episode(torch.rand(2, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(2, 1),
                 torch.rand(2, 10, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(2).repeat(2, 1), 5)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b.predict(ep), a.predict(ep), rtol=1e-4, atol=1e-4)
