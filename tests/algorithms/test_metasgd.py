"""Meta-SGD: learned per-weight inner rates through the gradient family's shell, checked in float64."""


import pytest
import torch
from test_adaptation import _fd_rel_error
from test_maml import SmoothConv, make_episodes

from conftest import one_error_line, run_cli, smoke_eval, smoke_train
from fewshot_runner.algorithms.metasgd import MetaSGD, rate_key


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def make_metasgd(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"inner_lr_init": 0.1, "inner_lr_init_max": 0.5, "inner_steps": 2, **kw}  # rates that differ per element
    return MetaSGD(SmoothConv(), n_way=3, feature_dim=12, **kw).double()


def test_metasgd_meta_gradient_matches_finite_differences():
    """theta and the rates, second order, 2 inner steps, 3 sampled elements of every tensor: 1e-6 relative."""
    m = make_metasgd()
    eps = make_episodes()
    rel = _fd_rel_error(m, lambda: m.meta_loss(eps)[0])
    assert rel < 1e-6, rel
    g = torch.autograd.grad(m.meta_loss(eps)[0], list(m.inner_lrs.values()))
    assert all(float(x.abs().max()) > 0 for x in g)  # every rate tensor is meta-learned


def test_metasgd_rates_have_each_parameter_shape_and_travel_in_the_state_dict():
    m = make_metasgd()
    for name, p in m.net.named_parameters():
        r = m.inner_lrs[rate_key(name)]
        assert r.shape == p.shape and 0.1 <= float(r.detach().min()) and float(r.detach().max()) <= 0.5
    assert "inner_lrs.0__conv1__weight" in m.state_dict()
    const = MetaSGD(SmoothConv(), n_way=3, feature_dim=12, inner_lr_init=0.4)
    assert all(bool((r == 0.4).all()) for r in const.inner_lrs.values())
    # a second model given the first's state_dict predicts the same (the learned rates included)
    other = make_metasgd(seed=1)
    other.load_state_dict(m.state_dict())
    eps = make_episodes()
    with torch.no_grad():
        torch.testing.assert_close(other.predict(eps), m.predict(eps), rtol=0, atol=0)
        with_other_rates = make_metasgd(seed=0)
        for r in with_other_rates.inner_lrs.values():
            r.mul_(2)
        assert not torch.equal(with_other_rates.predict(eps), m.predict(eps))


def test_metasgd_offers_no_test_time_inner_lr_and_gives_the_rates_their_own_group_when_asked():
    assert MetaSGD.eval_settings == ("eval_inner_steps",)
    m = make_metasgd()
    assert len(m.param_groups()) == 1
    groups = make_metasgd(rates_lr=1e-4).param_groups()
    assert groups[1]["lr"] == 1e-4 and len(groups[1]["params"]) == len(list(m.net.parameters()))

def test_metasgd_vmap_and_grouped_convolutions_give_the_loop_meta_gradient_and_predictions_in_float64():
    from fewshot_runner.backbones.conv import Conv4

    eps = make_episodes(n_tasks=3, size=16)
    grads, preds = {}, {}
    for mode in ("off", "on", "groups"):
        torch.manual_seed(0)
        m = MetaSGD(Conv4((1, 16, 16), hidden=4, pool=False, fused_ops="off"), n_way=3, feature_dim=4,
                    inner_lr_init=0.1, inner_lr_init_max=0.5, inner_steps=2, eval_inner_steps=2,
                    batch_tasks=mode).double()
        grads[mode] = torch.autograd.grad(m.meta_loss(eps)[0], list(m.parameters()))
        with torch.no_grad():
            preds[mode] = m.predict(eps)
        assert not preds[mode].requires_grad and all(p.grad is None for p in m.parameters())
    for mode in ("on", "groups"):
        for a, b in zip(grads["off"], grads[mode]):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), mode
        torch.testing.assert_close(preds[mode], preds["off"], rtol=1e-9, atol=1e-12)


def test_metasgd_smoke_train_then_eval_refuses_a_test_time_inner_lr(tmp_path):
    run, _ = smoke_train(tmp_path, ["algo=metasgd", "debug=smoke", "backbone.hidden=8", "device.threads=1",
                                    "train.val_episodes=4", "eval.n_episodes=6"])
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)["model"]
    assert any(k.startswith("inner_lrs.") for k in state)
    assert not torch.equal(state["inner_lrs.1__weight"], torch.full_like(state["inner_lrs.1__weight"], 0.4))  # learned
    smoke_eval(run, tmp_path, "algo.eval_inner_steps=2", "eval.n_episodes=10")
    p = run_cli(["eval", f"checkpoint={best}", "algo.inner_lr=0.1", "device=cpu", f"hydra.run.dir={tmp_path / 'x'}"],
                tmp_path)
    one_error_line(p, "inner_lr")
