"""Matching Networks: the cosine attention and its label sum against a hand computation, the full context
embeddings against LSTM equations written out here, the loss's float64 gradient against central differences,
and the CLI (smoke train with FCE, eval, kill + resume)."""

import math

import pytest
import torch
from test_faults import records
from torch import nn

from conftest import RESUMABLE_STEPS, kill_and_resume, smoke_eval, smoke_train
from fewshot_runner.algorithms.matchingnet import MatchingNetworks
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def fixed_episode():
    """One task, 2-way 2-shot, 3 queries, 3-d 'images' (the backbone is the identity), labels not class-major."""
    xs = torch.tensor([[[1.0, 0.0, 0.0], [0.2, 1.0, 0.0], [0.9, 0.3, 0.1], [0.0, 0.8, 0.5]]], dtype=torch.float64)
    ys = torch.tensor([[0, 1, 0, 1]])
    xq = torch.tensor([[[1.0, 0.1, 0.0], [0.1, 1.0, 0.2], [0.5, 0.5, 0.5]]], dtype=torch.float64)
    yq = torch.tensor([[0, 1, 1]])
    return Episode(xs, ys, xq, yq, 2)


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_matching_scores_are_the_cosine_attention_label_sum_by_hand(scale):
    ep = fixed_episode()
    net = MatchingNetworks(nn.Identity(), n_way=2, feature_dim=3, scale=scale)
    logits = net.predict(ep)[0]
    loss, metrics = net.meta_loss(ep)
    nll = []
    for q in range(3):
        x = ep.query_x[0, q]
        cos = [scale * float(x @ s / (x.norm() * s.norm())) for s in ep.support_x[0]]
        attention = [math.exp(c) / sum(math.exp(d) for d in cos) for c in cos]
        for k in range(2):
            p = sum(a for a, y in zip(attention, ep.support_y[0].tolist()) if y == k)
            assert logits[q, k].item() == pytest.approx(math.log(p), rel=1e-12, abs=1e-14)
        nll.append(-logits[q, int(ep.query_y[0, q])].item())
    assert loss.item() == pytest.approx(sum(nll) / 3, rel=1e-12)
    assert metrics["acc"].item() == pytest.approx(1.0)  # each query is closest to its own class here
    assert logits.exp().sum(-1).tolist() == pytest.approx([1.0] * 3, rel=1e-12)  # a distribution over the classes


def test_matching_sharp_attention_stays_finite_and_a_bad_scale_is_one_line():
    """A large scale puts exp(-2 * scale) ~ 1e-87 on a far class: computed in log space, its log-probability is
    finite (-2 * scale, not log 0 = -inf), and the loss stays finite."""
    ep = Episode(torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]], dtype=torch.float64).transpose(0, 1),
                 torch.tensor([[0, 1]]), torch.tensor([[[1.0, 0.0]]], dtype=torch.float64), torch.tensor([[0]]), 2)
    net = MatchingNetworks(nn.Identity(), n_way=2, feature_dim=2, scale=100.0)
    logits = net.predict(ep)[0, 0]
    assert logits[1].item() == pytest.approx(-200.0, rel=1e-12)  # log softmax([100, -100])[1]
    assert torch.isfinite(net.meta_loss(ep)[0])
    with pytest.raises(UserError, match="algo.scale=0"):
        MatchingNetworks(nn.Identity(), n_way=2, feature_dim=2, scale=0)


def lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step written out (gates i, f, g, o in torch's order): x (B, I), h and c (B, H)."""
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_full_context_embeddings_follow_the_paper_equations_and_change_the_embedding():
    """g(x_i, S) = forward + backward LSTM states + g'(x_i); f(x, S) = h_K of the attention LSTM with
    h_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}) + f'(x), r = softmax(h . g(S)) g(S), h_0 = f'(x), c_0 = 0."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    T, S, Q, D, K = 2, 4, 3, 3, 2
    ep = Episode(torch.randn(T, S, D, generator=g, dtype=torch.float64), torch.tensor([[0, 1, 0, 1]] * T),
                 torch.randn(T, Q, D, generator=g, dtype=torch.float64), torch.tensor([[0, 1, 1]] * T), 2)
    net = MatchingNetworks(nn.Identity(), n_way=2, feature_dim=D, fce=True, fce_steps=K).double()
    with torch.no_grad():
        emb = net.embed_episode(ep)
        assert emb["support"].shape == (T, S, D) and emb["query"].shape == (T, Q, D)
        lstm, cell = net.fce.support_lstm, net.fce.query_cell
        for t in range(T):
            zs, zq = ep.support_x[t], ep.query_x[t]
            h = c = torch.zeros(1, D, dtype=torch.float64)
            fwd = []
            for i in range(S):
                h, c = lstm_step(zs[i:i + 1], h, c, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0,
                                 lstm.bias_hh_l0)
                fwd.append(h)
            h = c = torch.zeros(1, D, dtype=torch.float64)
            bwd = [None] * S
            for i in reversed(range(S)):
                h, c = lstm_step(zs[i:i + 1], h, c, lstm.weight_ih_l0_reverse, lstm.weight_hh_l0_reverse,
                                 lstm.bias_ih_l0_reverse, lstm.bias_hh_l0_reverse)
                bwd[i] = h
            support_g = torch.cat(fwd) + torch.cat(bwd) + zs
            torch.testing.assert_close(emb["support"][t], support_g, rtol=1e-12, atol=1e-14)
            for q in range(Q):
                x = zq[q:q + 1]
                h, c = x, torch.zeros(1, D, dtype=torch.float64)
                for _ in range(K):
                    a = (h @ support_g.T).softmax(-1)
                    r = a @ support_g
                    h_hat, c = lstm_step(torch.cat([x, r], 1), h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                         cell.bias_hh)
                    h = h_hat + x
                torch.testing.assert_close(emb["query"][t, q:q + 1], h, rtol=1e-12, atol=1e-14)
        plain = MatchingNetworks(nn.Identity(), n_way=2, feature_dim=D).embed_episode(ep)
    assert not torch.allclose(emb["support"], plain["support"]) and not torch.allclose(emb["query"], plain["query"])
    torch.testing.assert_close(plain["support"], ep.support_x)
    torch.testing.assert_close(plain["query"], ep.query_x)
    with pytest.raises(UserError, match="algo.fce_steps"):
        MatchingNetworks(nn.Identity(), n_way=2, feature_dim=D, fce=True, fce_steps=0)


def assert_gradient_matches_finite_differences(model, loss_fn, h=1e-6, tol=1e-6):
    """d loss / d every parameter (up to 12 entries of each) against central differences, float64."""
    grads = torch.autograd.grad(loss_fn(), list(model.parameters()))
    fds, ans = [], []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            flat = p.view(-1)
            n = flat.numel()
            idx = range(n) if n <= 12 else torch.randperm(n, generator=gen)[:12].tolist()
            for i in idx:
                orig = flat[i].item()
                flat[i] = orig + h
                lp = loss_fn().item()
                flat[i] = orig - h
                lm = loss_fn().item()
                flat[i] = orig
                fds.append((lp - lm) / (2 * h))
                ans.append(g.reshape(-1)[i].item())
    fd, an = torch.tensor(fds, dtype=torch.float64), torch.tensor(ans, dtype=torch.float64)
    assert an.abs().max() > 1e-4  # (a real gradient, not zeros on both sides)
    rel = ((fd - an).norm() / an.norm()).item()
    assert rel < tol, rel


@pytest.mark.parametrize("fce", [False, True])
def test_matching_loss_gradient_matches_finite_differences_in_float64(fce):
    """A tiny smooth backbone (Linear + softplus: 15 weights) and, with FCE, its two LSTMs of size 3."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    ep = Episode(torch.randn(2, 6, 4, generator=g, dtype=torch.float64), torch.tensor([[0, 1, 2, 2, 1, 0]] * 2),
                 torch.randn(2, 6, 4, generator=g, dtype=torch.float64), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2), 3)
    net = MatchingNetworks(nn.Sequential(nn.Linear(4, 3), nn.Softplus()), n_way=3, feature_dim=3, fce=fce,
                           fce_steps=2).double()
    with torch.enable_grad():
        assert_gradient_matches_finite_differences(net, lambda: net.meta_loss(ep)[0])


FAST = ["algo=matchingnet", "algo.fce=true", "debug=smoke", "backbone.hidden=8", "device.threads=1",
        "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]
RESUMABLE = [*FAST, *RESUMABLE_STEPS]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """`fewshot train algo=matchingnet algo.fce=true debug=smoke` (4 steps, checkpoints at 2 and 4), run once."""
    return smoke_train(tmp_path_factory.mktemp("matchingnet"), RESUMABLE)[0]


def test_matching_smoke_train_with_fce_then_eval(unbroken, tmp_path):
    rows = records(unbroken)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses)
    smoke_eval(unbroken, tmp_path, "eval.n_episodes=6")


@pytest.mark.slow
def test_matching_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """Killed in step 3 (last.pt at 2), resumed with resume=auto: bitwise equal to the unbroken run (slow: the
    same machinery as test_relationnet.py's, also slow: see there)."""
    kill_and_resume(RESUMABLE, unbroken, tmp_path)
