"""The shared functional adaptation with the update rule as a parameter (algorithms/adaptation.py), through
the gradient-based shell (algorithms/gradient.py): learned rates per parameter (Meta-SGD) and per step
(MAML++), adapting a subset of the parameters (ANIL), on each of the three task executions, in float64."""

import pytest
import torch
from test_maml import SmoothConv, make_episodes
from torch import nn

from fewshot_runner.algorithms.adaptation import PerParameterLR, PerStepLR, ScalarLR, adapt, sgd_update
from fewshot_runner.algorithms.gradient import GradientLearner
from fewshot_runner.algorithms.maml import MAML
from fewshot_runner.backbones.conv import Conv4

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 nets: one intra-op thread (tests/conftest.py)


def _key(name: str) -> str:
    return name.replace(".", "__")


class LearnedRates(GradientLearner):
    """A learned rate tensor per parameter (``per_step=False``: each parameter's shape, Meta-SGD) or per
    parameter tensor and step (``per_step=True``: MAML++'s LSLR); ``keys``: the adapted parameters."""

    def __init__(self, backbone, n_way, feature_dim, inner_steps=2, per_step=False, keys=None, batch_tasks="off",
                 init=0.3):
        super().__init__(backbone, n_way, feature_dim, inner_steps, inner_steps, batch_tasks)
        self.keys = keys
        named = dict(self.net.named_parameters())
        names = keys if keys is not None else list(named)
        self.rates = nn.ParameterDict({
            _key(k): nn.Parameter(torch.full((inner_steps,) if per_step else named[k].shape, init)) for k in names})
        self.per_step = per_step

    def meta_params(self):
        return dict(self.net.named_parameters())  # (the rates are meta-parameters too, held by the rule)

    def update_rule(self):
        lrs = {k: self.rates[_key(k)] for k in (self.keys or dict(self.net.named_parameters()))}
        return PerStepLR(lrs) if self.per_step else PerParameterLR(lrs)

    def adapted_keys(self):
        return self.keys


def _learner(per_step=False, keys=None, seed=0, backbone=None, feature_dim=12, batch_tasks="off"):
    torch.manual_seed(seed)
    m = LearnedRates(backbone or SmoothConv(), 3, feature_dim, per_step=per_step, keys=keys, batch_tasks=batch_tasks)
    with torch.no_grad():  # rates that differ per element, so a wrong broadcast or index shows
        for p in m.rates.values():
            p.uniform_(0.1, 0.5)
    return m.double()


def _fd_rel_error(module, loss_fn, n_per_tensor=3, h=1e-5, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = loss_fn()
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    fds, ans = [], []
    with torch.no_grad():
        for p, gr in zip(params, grads):
            flat = p.view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[:n_per_tensor].tolist()
            for i in idx:
                orig = flat[i].item()
                flat[i] = orig + h
                with torch.enable_grad():
                    lp = loss_fn().item()
                flat[i] = orig - h
                with torch.enable_grad():
                    lm = loss_fn().item()
                flat[i] = orig
                fds.append((lp - lm) / (2 * h))
                ans.append(gr.reshape(-1)[i].item())
    fd, an = torch.tensor(fds, dtype=torch.float64), torch.tensor(ans, dtype=torch.float64)
    return ((fd - an).norm() / an.norm()).item()


@pytest.mark.parametrize("per_step", [False, True], ids=["per_parameter", "per_step"])
def test_learned_rate_meta_gradients_match_finite_differences(per_step):
    m = _learner(per_step=per_step)
    eps = make_episodes()
    rel = _fd_rel_error(m, lambda: m.meta_loss(eps)[0])
    assert rel < 1e-6, rel
    loss, _ = m.meta_loss(eps)
    g_rates = torch.autograd.grad(loss, list(m.rates.values()))
    assert all(float(g.abs().max()) > 0 for g in g_rates)  # the rates are meta-learned


def test_adapting_the_head_only_equals_zero_rates_for_the_body():
    """ANIL's shape: adapting only the head's parameters gives, in float64, the meta-gradient of adapting
    all of them with rate 0 for the body; the body gets no inner update but a non-zero outer gradient."""
    head = ["1.weight", "1.bias"]
    eps = make_episodes()
    only = _learner(keys=head)
    every = _learner()
    with torch.no_grad():
        for k, p in every.rates.items():
            p.copy_(only.rates[k] if k in only.rates else torch.zeros_like(p))
        for a, b in zip(every.net.parameters(), only.net.parameters()):
            a.copy_(b)
    params = only.meta_params()
    fast = adapt(only.net, params, eps.support_x[0], eps.support_y[0], only.update_rule(), 2, True, keys=head)
    assert all(fast[k] is params[k] for k in params if k not in head)  # the body passes through
    ga = torch.autograd.grad(only.meta_loss(eps)[0], list(only.net.parameters()))
    gb = torch.autograd.grad(every.meta_loss(eps)[0], list(every.net.parameters()))
    for (name, _), a, b in zip(only.net.named_parameters(), ga, gb):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), name
    body = [g for (name, _), g in zip(only.net.named_parameters(), ga) if name.startswith("0.conv") and "weight" in name]
    assert all(float(g.abs().max()) > 0 for g in body)


def test_the_three_task_executions_give_the_same_learned_rate_meta_gradient():
    """The loop, vmap and grouped convolutions with a per-parameter rule and a subset of adapted keys
    (Conv4 without max-pool, plain ops, float64)."""
    eps = make_episodes(n_tasks=3, size=16)

    def conv():
        torch.manual_seed(1)  # the same backbone weights for every execution
        return Conv4((1, 16, 16), hidden=4, pool=False, fused_ops="off")

    names = dict(_learner(backbone=conv(), feature_dim=4).net.named_parameters())
    keys = [k for k in names if not k.startswith("0.blocks.0.")]  # all but the first block's parameters adapt
    grads = {}
    for mode in ("off", "on", "groups"):
        m = _learner(backbone=conv(), feature_dim=4, batch_tasks=mode, keys=keys)
        assert m.task_mode(eps) == mode
        loss, _ = m.meta_loss(eps)
        grads[mode] = torch.autograd.grad(loss, list(m.parameters()))
    for mode in ("on", "groups"):
        for a, b in zip(grads["off"], grads[mode]):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), mode


def test_maml_is_the_scalar_rule_of_the_shared_shell():
    m = MAML(SmoothConv(), n_way=3, feature_dim=12, inner_lr=0.25)
    assert m.update_rule() == ScalarLR(0.25) and m.adapted_keys() is None and m.second_order()
    p = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    g = [torch.tensor([0.5, -1.0]), torch.tensor([2.0])]
    assert all(torch.equal(x, y) for x, y in zip(sgd_update(p, g, 0.25).values(), [p["a"] - 0.25 * g[0], p["b"] - 0.25 * g[1]]))
    rule = PerStepLR({"a": torch.tensor([0.1, 0.2])})
    assert torch.equal(rule({"a": p["a"]}, {"a": g[0]}, 1)["a"], p["a"] - 0.2 * g[0])
