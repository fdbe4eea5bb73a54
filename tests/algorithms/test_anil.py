"""ANIL: the inner loop adapts the head only; checked in float64 against Meta-SGD's per-weight rule with zero
rates for the body (MAML with the body's inner rate set to 0) and against finite differences."""

import pytest
import torch
from test_adaptation import _fd_rel_error
from test_maml import SmoothConv, make_episodes

from conftest import smoke_eval, smoke_train
from fewshot_runner.algorithms.adaptation import adapt
from fewshot_runner.algorithms.anil import ANIL
from fewshot_runner.algorithms.metasgd import MetaSGD, rate_key

HEAD = ["1.weight", "1.bias"]


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def make_anil(seed=0, inner_steps=2):
    torch.manual_seed(seed)
    return ANIL(SmoothConv(), n_way=3, feature_dim=12, inner_lr=0.3, inner_steps=inner_steps).double()


def test_anil_adapts_the_head_only():
    m = make_anil()
    assert list(m.adapted_keys()) == HEAD
    eps = make_episodes()
    params = m.meta_params()
    fast = adapt(m.net, params, eps.support_x[0], eps.support_y[0], m.update_rule(), 2, True, keys=m.adapted_keys())
    assert all(fast[k] is params[k] for k in params if k not in HEAD)  # the body: no inner update at all
    assert all(not torch.equal(fast[k], params[k]) for k in HEAD)


def test_anil_meta_gradient_equals_maml_with_a_zero_inner_rate_for_the_body():
    """Second order, 2 inner steps, float64: ANIL's meta-gradient is, to 1e-10, that of MAML whose inner
    rate is 0.3 for the head and 0 for the body (Meta-SGD's per-weight rule with those rates); the body's
    outer gradient is non-zero."""
    eps = make_episodes()
    anil = make_anil()
    zero_body = MetaSGD(SmoothConv(), n_way=3, feature_dim=12, inner_lr_init=0.0, inner_steps=2).double()
    with torch.no_grad():
        for a, b in zip(zero_body.net.parameters(), anil.net.parameters()):
            a.copy_(b)
        for k in HEAD:
            zero_body.inner_lrs[rate_key(k)].fill_(0.3)
    ga = torch.autograd.grad(anil.meta_loss(eps)[0], list(anil.net.parameters()))
    gb = torch.autograd.grad(zero_body.meta_loss(eps)[0], list(zero_body.net.parameters()))
    for (name, _), a, b in zip(anil.net.named_parameters(), ga, gb):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), name
    body = {name: g for (name, _), g in zip(anil.net.named_parameters(), ga) if name.startswith("0.")
            and not name.endswith(("conv1.bias", "conv2.bias"))}  # (conv biases before batch norm: exactly 0)
    assert body and all(float(g.abs().max()) > 1e-6 for g in body.values()), body.keys()


def test_anil_meta_gradient_matches_finite_differences():
    m = make_anil()
    eps = make_episodes()
    rel = _fd_rel_error(m, lambda: m.meta_loss(eps)[0])
    assert rel < 1e-6, rel


def test_anil_grouped_convolutions_and_vmap_give_the_loop_meta_gradient_in_float64():
    from fewshot_runner.backbones.conv import Conv4

    eps = make_episodes(n_tasks=3, size=16)
    grads = {}
    for mode in ("off", "on", "groups"):
        torch.manual_seed(0)
        m = ANIL(Conv4((1, 16, 16), hidden=4, pool=False, fused_ops="off"), n_way=3, feature_dim=4, inner_lr=0.3,
                 inner_steps=2, batch_tasks=mode).double()
        grads[mode] = torch.autograd.grad(m.meta_loss(eps)[0], list(m.parameters()))
    for mode in ("on", "groups"):
        for a, b in zip(grads["off"], grads[mode]):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), mode


def test_anil_smoke_train_then_eval(tmp_path):
    run, p = smoke_train(tmp_path, ["algo=anil", "debug=smoke", "backbone.hidden=8", "device.threads=1",
                                    "train.val_episodes=4", "eval.n_episodes=6"])
    assert "ANIL" in p.stdout
    smoke_eval(run, tmp_path, "algo.eval_inner_steps=5", "algo.inner_lr=0.2", "eval.n_episodes=10")
