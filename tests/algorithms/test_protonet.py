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


def _shuffled_episode(g, n_tasks, n_way, n_shot, n_query, d):
    """Labels in a random order within support and within query (not class-major)."""
    ys = torch.stack([torch.arange(n_way).repeat_interleave(n_shot)[torch.randperm(n_way * n_shot, generator=g)]
                      for _ in range(n_tasks)])
    yq = torch.stack([torch.arange(n_way).repeat_interleave(n_query)[torch.randperm(n_way * n_query, generator=g)]
                      for _ in range(n_tasks)])
    xs = torch.randn(n_tasks, n_way * n_shot, d, generator=g, dtype=torch.float64)
    xq = torch.randn(n_tasks, n_way * n_query, d, generator=g, dtype=torch.float64)
    return Episode(xs, ys, xq, yq, n_way)


@pytest.mark.parametrize("n_shot,n_query", [(1, 3), (2, 3)])
def test_rotated_support_loss_is_the_mean_over_resplit_episodes(n_shot, n_query):
    """algo.rotate_support=true: the loss is the plain ProtoNet loss averaged over the k = shot + query
    episodes in which each class's images (support first, then query, in the order given) take turns
    as the support; each re-split episode built by hand and scored by the plain path."""
    g = torch.Generator().manual_seed(0)
    n_way, d, k = 4, 5, n_shot + n_query
    ep = _shuffled_episode(g, 2, n_way, n_shot, n_query, d)
    rotated = PrototypicalNetworks(nn.Identity(), n_way, d, rotate_support=True)
    plain = PrototypicalNetworks(nn.Identity(), n_way, d)
    loss, metrics = rotated.meta_loss(ep)
    losses, accs = [], []
    for r in range(k):
        sx, sy, qx, qy = [], [], [], []
        for t in range(2):
            per_class = [torch.cat([ep.support_x[t][ep.support_y[t] == c], ep.query_x[t][ep.query_y[t] == c]])
                         for c in range(n_way)]
            sx.append(torch.cat([imgs[[(r + j) % k for j in range(n_shot)]] for imgs in per_class]))
            qx.append(torch.cat([imgs[[(r + n_shot + j) % k for j in range(n_query)]] for imgs in per_class]))
            sy.append(torch.arange(n_way).repeat_interleave(n_shot))
            qy.append(torch.arange(n_way).repeat_interleave(n_query))
        l, m = plain.meta_loss(Episode(torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy), n_way))
        losses.append(l)
        accs.append(m["acc"])
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["acc"], torch.stack(accs).mean())
    # prediction (and so validation and test) is the plain ProtoNet's
    torch.testing.assert_close(rotated.predict(ep), plain.predict(ep))


class _Affine(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t() + self.b


def test_rotated_support_gradient_matches_finite_differences():
    """float64 gradcheck of the rotated loss through an affine backbone's weights."""
    g = torch.Generator().manual_seed(1)
    ep = _shuffled_episode(g, 2, 3, 1, 2, 4)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(w, b):
        return PrototypicalNetworks(_Affine(w, b), 3, 3, rotate_support=True).meta_loss(ep)[0]

    assert torch.autograd.gradcheck(loss, (w, b))


def test_rotated_support_refuses_unequal_class_counts():
    ep = Episode(torch.randn(1, 3, 2), torch.tensor([[0, 1, 1]]), torch.randn(1, 3, 2), torch.tensor([[0, 1, 0]]), 2)
    with pytest.raises(ValueError, match="rotate_support"):
        PrototypicalNetworks(nn.Identity(), 2, 2, rotate_support=True).meta_loss(ep)
