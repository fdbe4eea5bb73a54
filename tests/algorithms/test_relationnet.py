"""Relation Networks: what the relation module sees ([class sum of support maps, query map] on channels), the
sigmoid scores and the MSE to one-hot against a hand computation, the loss's float64 gradient against central
differences, the paper's embedding net (Conv4 pool_blocks=2), one-line refusals, and the CLI (smoke train,
eval, kill + resume)."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_faults import records
from test_matchingnet import assert_gradient_matches_finite_differences
from torch import nn

from conftest import RESUMABLE_STEPS, kill_and_resume, smoke_eval, smoke_train
from fewshot_runner.algorithms.relationnet import RelationNetworks, class_sums, relation_pairs
from fewshot_runner.backbones import use_channels_last
from fewshot_runner.backbones.conv import Conv4
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


class MapIdentity(nn.Module):
    """A 'backbone' whose inputs are already the maps (N, C, h, w)."""

    def forward_map(self, x):
        return x

    def forward(self, x):
        return x.flatten(1)


class SmoothMaps(nn.Module):
    """A tiny smooth embedding (conv 1 -> 2 channels, softplus, average pooling: 20 weights) with forward_map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward_map(self, x):
        return F.avg_pool2d(F.softplus(self.conv(x)), 2)

    def forward(self, x):
        return self.forward_map(x).flatten(1)


def episode(n_tasks=2, n_way=3, n_shot=2, n_query=2, shape=(2, 3, 3), seed=0):
    """Support labels shuffled within each task (not class-major)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.stack([torch.arange(n_way).repeat_interleave(n_shot)[torch.randperm(n_way * n_shot, generator=g)]
                      for _ in range(n_tasks)])
    yq = torch.arange(n_way).repeat_interleave(n_query).repeat(n_tasks, 1)
    return Episode(torch.randn(n_tasks, n_way * n_shot, *shape, generator=g, dtype=torch.float64), ys,
                   torch.randn(n_tasks, n_way * n_query, *shape, generator=g, dtype=torch.float64), yq, n_way)


def test_relation_module_sees_the_class_sum_and_the_query_concatenated_and_scores_by_hand():
    """2-shot: the module's input for (query q, class n) is [sum of class n's support maps, query q's map] on
    channels; scores = sigmoid(relation(pair)) one pair at a time (eval mode: no batch statistics); the loss is
    the mean of (score - [y_q = n])^2; predict gives the scores' logits."""
    torch.manual_seed(0)
    ep = episode()
    C, h = 2, 3
    net = RelationNetworks(MapIdentity(), n_way=3, feature_dim=C * h * h, map_channels=C, relation_channels=4,
                           relation_hidden=5, fused_ops="off").double().eval()
    loss, metrics = net.meta_loss(ep)
    logits = net.predict(ep)
    pairs = relation_pairs(class_sums(ep.support_x, ep.support_y, 3), ep.query_x)  # the definition's input
    sq = 0.0
    for t in range(2):
        for n in range(3):
            class_sum = sum(ep.support_x[t, i] for i in range(6) if ep.support_y[t, i] == n)
            for q in range(6):
                expected_pair = torch.cat([class_sum, ep.query_x[t, q]], dim=0)
                assert torch.equal(pairs[t, q, n], expected_pair)
                with torch.no_grad():
                    score = torch.sigmoid(net.relation.score_pairs(expected_pair[None]))[0].item()
                assert torch.sigmoid(logits[t, q, n]).item() == pytest.approx(score, rel=1e-12, abs=1e-15)
                sq += (score - float(ep.query_y[t, q] == n)) ** 2
    assert loss.item() == pytest.approx(sq / (2 * 6 * 3), rel=1e-12)
    assert metrics["acc"].item() == pytest.approx((logits.argmax(-1) == ep.query_y).double().mean().item())
    emb = net.embed_episode(ep)
    assert emb["support"].shape == (2, 6, 18) and emb["query"].shape == (2, 6, 18)
    torch.testing.assert_close(emb["prototypes"][0, 1], sum(ep.support_x[0, i].flatten()
                                                           for i in range(6) if ep.support_y[0, i] == 1))


@pytest.mark.parametrize("fused_ops,channels_last", [("off", False), ("off", True), ("auto", True)])
def test_split_first_convolution_equals_the_module_on_concatenated_pairs_in_float64(fused_ops, channels_last):
    """The module's forward never builds the N x Q pair maps: its first convolution runs on the class sums and the
    queries apart (linearity).  In training mode (batch statistics over all pairs, running statistics updated)
    its logits, their gradients and the updated running statistics equal score_pairs on the explicit
    [class sum, query] concatenations, in float64 (paper net: 7 x 7 maps, both blocks pool)."""
    torch.manual_seed(0)
    ep = episode(n_tasks=2, n_way=3, n_shot=2, n_query=2, shape=(4, 7, 7), seed=3)
    nets = []
    for _ in range(2):
        torch.manual_seed(1)
        net = RelationNetworks(MapIdentity(), n_way=3, feature_dim=4 * 7 * 7, map_channels=4, relation_channels=5,
                               relation_hidden=3, fused_ops=fused_ops).double().train()
        if channels_last:
            use_channels_last(net.relation)
        nets.append(net)
    split, plain = nets
    sums = class_sums(ep.support_x, ep.support_y, 3)
    got = split.relation(sums, ep.query_x)
    want = plain.relation.score_pairs(relation_pairs(sums, ep.query_x).flatten(0, 2)).view(2, 6, 3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    weights = torch.randn(got.shape, dtype=torch.float64)
    g_split = torch.autograd.grad((got * weights).sum(), list(split.relation.parameters()))
    g_plain = torch.autograd.grad((want * weights).sum(), list(plain.relation.parameters()))
    for a, b in zip(g_split, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    for a, b in zip(split.relation.buffers(), plain.relation.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert not torch.equal(split.relation.blocks[0].bn.running_mean, torch.zeros(5, dtype=torch.float64))


def test_relation_module_is_the_papers_two_pooled_blocks_and_two_linear_layers():
    """On the paper's embedding (7 x 7 maps of 64 channels on 28 x 28 here) both blocks pool: 7 -> 3 -> 1,
    so fc1 reads 64 features, as the paper's H = 64 on Omniglot; on 1 x 1 maps (conv4) no block pools."""
    paper = RelationNetworks(Conv4((1, 28, 28), pool_blocks=2), n_way=5, feature_dim=64 * 7 * 7)
    assert [b.pool for b in paper.relation.blocks] == [True, True]
    assert paper.relation.blocks[0].conv.in_channels == 128 and paper.relation.fc1.in_features == 64
    assert (paper.relation.fc1.out_features, paper.relation.fc2.out_features) == (8, 1)
    small = RelationNetworks(Conv4((1, 28, 28)), n_way=5, feature_dim=64)
    assert [b.pool for b in small.relation.blocks] == [False, False] and small.relation.fc1.in_features == 64


@pytest.mark.parametrize("n_shot", [1, 2])
def test_relation_loss_gradient_matches_finite_differences_in_float64(n_shot):
    torch.manual_seed(0)
    ep = episode(n_shot=n_shot, shape=(1, 4, 4), seed=1)
    net = RelationNetworks(SmoothMaps(), n_way=3, feature_dim=2 * 2 * 2, map_channels=2, relation_channels=3,
                           relation_hidden=3, fused_ops="off").double()
    with torch.enable_grad():
        assert_gradient_matches_finite_differences(net, lambda: net.meta_loss(ep)[0])


def test_conv4_pool_blocks_pools_only_in_the_first_blocks():
    x = torch.zeros(2, 1, 28, 28)
    assert Conv4((1, 28, 28), hidden=4, pool_blocks=2).forward_map(x).shape == (2, 4, 7, 7)
    assert Conv4((3, 84, 84), hidden=4, pool_blocks=2).forward_map(torch.zeros(2, 3, 84, 84)).shape == (2, 4, 21, 21)
    assert Conv4((1, 28, 28), hidden=4, pool=False, pool_blocks=1).forward_map(x).shape == (2, 4, 14, 14)
    default = Conv4((1, 28, 28), hidden=4)
    assert [(b.pool, b.conv.stride) for b in default.blocks] == [(True, (1, 1))] * 4
    assert [b.conv.stride for b in Conv4((1, 28, 28), hidden=4, pool=False).blocks] == [(2, 2)] * 4


def test_relation_refuses_a_map_channel_count_that_does_not_fit_the_backbone_in_one_line():
    with pytest.raises(UserError, match="algo.map_channels=64") as e:
        RelationNetworks(Conv4((1, 28, 28), hidden=8, pool_blocks=2), n_way=5, feature_dim=8 * 7 * 7)
    assert "\n" not in str(e.value)
    # 16 channels of 14 x 14 hold as many numbers as 64 of 7 x 7: refused at the first batch
    net = RelationNetworks(Conv4((1, 28, 28), hidden=16, pool_blocks=1), n_way=2, feature_dim=64 * 7 * 7)
    ep = Episode(torch.zeros(1, 2, 1, 28, 28), torch.tensor([[0, 1]]), torch.zeros(1, 2, 1, 28, 28),
                 torch.tensor([[0, 1]]), 2)
    with pytest.raises(UserError, match="algo.map_channels"):
        net.meta_loss(ep)


@pytest.mark.slow
def test_compiled_relation_network_gives_the_same_scores_and_state_dict_keys():
    """device.compile=true: the backbone's forward_map and the relation module compiled (about a minute on a
    CPU); nn.Module.compile would have compiled the backbone's forward only, which this learner never calls."""
    torch.manual_seed(0)
    a = RelationNetworks(Conv4((1, 28, 28), hidden=8, pool_blocks=2), n_way=5, feature_dim=8 * 49, map_channels=8)
    b = RelationNetworks(Conv4((1, 28, 28), hidden=8, pool_blocks=2), n_way=5, feature_dim=8 * 49, map_channels=8)
    b.load_state_dict(a.state_dict())
    b.compile_for_speed()
    assert list(a.state_dict()) == list(b.state_dict()) and b.compiled_map is not None
    g = torch.Generator().manual_seed(1)
    ep = Episode(torch.rand(2, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(2, 1),
                 torch.rand(2, 10, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(2).repeat(2, 1), 5)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b.predict(ep), a.predict(ep), rtol=1e-4, atol=1e-4)


FAST = ["algo=relationnet", "debug=smoke", "backbone=relation_conv4", "backbone.hidden=8", "algo.map_channels=8",
        "algo.relation_channels=8", "device.threads=1", "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]
RESUMABLE = [*FAST, *RESUMABLE_STEPS]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """`fewshot train algo=relationnet debug=smoke backbone=relation_conv4` (4 steps, checkpoints at 2 and 4)."""
    return smoke_train(tmp_path_factory.mktemp("relationnet"), RESUMABLE)[0]


def test_relation_smoke_train_then_eval(unbroken, tmp_path):
    rows = records(unbroken)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) and 0 < v < 1 for v in losses)  # MSE of sigmoid scores
    smoke_eval(unbroken, tmp_path, "eval.n_episodes=6", "data.n_way=7")


@pytest.mark.slow
def test_relation_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """Killed in step 3 (last.pt at 2), resumed with resume=auto: bitwise equal to the unbroken run (slow: two
    more CLI runs of ~7 s CPU each would take the default tier past its 30 s)."""
    kill_and_resume(RESUMABLE, unbroken, tmp_path)
