"""MAML / FOMAML meta-gradients, checked in float64 against independent computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.algorithms.maml import MAML
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 nets: one intra-op thread (tests/conftest.py)


class SmoothConv(nn.Module):
    """A smooth twin of Conv4 (softplus, average pooling) so finite differences are valid."""

    def __init__(self, c=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        x = F.avg_pool2d(F.softplus(self.bn1(self.conv1(x))), 2)
        x = F.avg_pool2d(F.softplus(self.bn2(self.conv2(x))), 2)
        return x.flatten(1)


def make_episodes(n_tasks=2, n_way=3, n_shot=2, n_query=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_tasks, n_way * n_shot, 1, size, size, generator=g, dtype=torch.float64)
    xq = torch.randn(n_tasks, n_way * n_query, 1, size, size, generator=g, dtype=torch.float64)
    ys = torch.arange(n_way).repeat_interleave(n_shot).repeat(n_tasks, 1)
    yq = torch.arange(n_way).repeat_interleave(n_query).repeat(n_tasks, 1)
    return Episode(xs, ys, xq, yq, n_way)


def make_maml(first_order=False, inner_steps=2, seed=0):
    torch.manual_seed(seed)
    backbone = SmoothConv()
    m = MAML(backbone, n_way=3, feature_dim=3 * 2 * 2, inner_lr=0.3, inner_steps=inner_steps,
             first_order=first_order).double()
    return m


def test_maml_meta_gradient_matches_finite_differences():
    maml = make_maml(first_order=False, inner_steps=2)
    eps = make_episodes()
    loss, _ = maml.meta_loss(eps)
    grads = torch.autograd.grad(loss, list(maml.parameters()))
    h = 1e-5
    fds, ans = [], []
    with torch.no_grad():
        for p, g in zip(maml.parameters(), grads):
            flat = p.view(-1)
            # every element of small tensors, a sample of the larger ones
            idx = range(flat.numel()) if flat.numel() <= 12 else torch.randperm(flat.numel())[:12].tolist()
            for i in idx:
                orig = flat[i].item()
                flat[i] = orig + h
                with torch.enable_grad():
                    lp = maml.meta_loss(eps)[0].item()
                flat[i] = orig - h
                with torch.enable_grad():
                    lm = maml.meta_loss(eps)[0].item()
                flat[i] = orig
                fds.append((lp - lm) / (2 * h))
                ans.append(g.view(-1)[i].item())
    fd, an = torch.tensor(fds, dtype=torch.float64), torch.tensor(ans, dtype=torch.float64)
    rel = ((fd - an).norm() / an.norm()).item()
    print("relative error", rel)
    assert rel < 1e-6, rel
    # a conv bias before a training-mode batch norm cancels out: its meta-gradient is 0
    for name, g in zip([n for n, _ in maml.named_parameters()], grads):
        if name.endswith(("conv1.bias", "conv2.bias")):
            assert g.abs().max().item() < 1e-12, name


def test_maml_second_order_differs_from_first_order():
    eps = make_episodes()
    m2, m1 = make_maml(False), make_maml(True)
    g2 = torch.autograd.grad(m2.meta_loss(eps)[0], list(m2.parameters()))
    g1 = torch.autograd.grad(m1.meta_loss(eps)[0], list(m1.parameters()))
    diff = max((a - b).abs().max().item() for a, b in zip(g1, g2))
    assert diff > 1e-4  # the second-order term is real on this net


def test_fomaml_gradient_equals_first_order_formula():
    maml = make_maml(first_order=True, inner_steps=2)
    eps = make_episodes()
    loss, _ = maml.meta_loss(eps)
    grads = torch.autograd.grad(loss, list(maml.parameters()))

    # independent: adapt detached copies with plain SGD, then average the query-loss
    # gradients at the adapted weights over tasks
    names = [n for n, _ in maml.net.named_parameters()]
    expected = [torch.zeros_like(p) for p in maml.parameters()]
    for t in range(eps.n_tasks):
        ep = eps.task(t)
        w = [p.detach().clone().requires_grad_() for p in maml.parameters()]
        for _ in range(2):
            out = torch.func.functional_call(maml.net, dict(zip(names, w)), (ep.support_x,))
            g = torch.autograd.grad(F.cross_entropy(out, ep.support_y), w)
            w = [(wi - 0.3 * gi).detach().requires_grad_() for wi, gi in zip(w, g)]
        out = torch.func.functional_call(maml.net, dict(zip(names, w)), (ep.query_x,))
        g = torch.autograd.grad(F.cross_entropy(out, ep.query_y), w)
        for e, gi in zip(expected, g):
            e += gi / eps.n_tasks
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_maml_predict_builds_no_outer_graph_and_keeps_weights():
    maml = make_maml()
    eps = make_episodes()
    before = [p.detach().clone() for p in maml.parameters()]
    with torch.no_grad():
        logits = maml.predict(eps)
    assert logits.shape == (2, 6, 3)
    assert not logits.requires_grad
    for p, b in zip(maml.parameters(), before):
        assert torch.equal(p, b) and p.grad is None


def test_maml_batch_norm_uses_batch_statistics():
    maml = make_maml()
    assert all(getattr(m, "running_mean", None) is None for m in maml.modules() if isinstance(m, nn.BatchNorm2d))
    assert "net.0.bn1.running_mean" not in maml.state_dict()


def test_maml_refuses_another_way():
    maml = make_maml()
    with pytest.raises(UserError, match="3-way head"):
        maml.check_n_way(5)


# ----------------------------------------------------------------------------- batch_tasks (vmap)
def grads_of(maml, eps):
    loss, metrics = maml.meta_loss(eps)
    return loss, metrics, torch.autograd.grad(loss, list(maml.parameters()))


@pytest.mark.parametrize("first_order", [False, True])
def test_vmapped_tasks_give_the_loop_meta_gradient_in_float64(first_order):
    """device.batch_tasks=on (vmap over tasks, torch.func.grad inner steps, batch norm from
    primitives) against the per-task loop: same loss, same meta-gradient to 1e-10."""
    eps = make_episodes(n_tasks=3)
    loop, batched = make_maml(first_order, inner_steps=2), make_maml(first_order, inner_steps=2)
    batched.batch_tasks = "on"
    la, ma, ga = grads_of(loop, eps)
    lb, mb, gb = grads_of(batched, eps)
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mb["acc"], ma["acc"])
    for (name, _), a, b in zip(loop.named_parameters(), ga, gb):
        err = ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
        assert err < 1e-10 or (a - b).abs().max() < 1e-13, (name, err)
    # the conv biases before a training-mode batch norm get exactly no meta-gradient (the fused
    # F.batch_norm under vmap gets this wrong, FIELD_NOTES)
    for (name, _), b in zip(batched.named_parameters(), gb):
        if name.endswith(("conv1.bias", "conv2.bias")):
            assert b.abs().max().item() < 1e-12, name


@pytest.mark.parametrize("pool", [True, False], ids=["maxpool", "strided"])
def test_vmapped_meta_gradient_on_conv4_matches_the_loop_in_float64(pool):
    """The real backbones (ReLU, max-pool or stride 2; the fused op must stand aside under vmap)."""
    eps = make_episodes(n_tasks=2, size=16)
    dim = 4  # 16x16 -> 1x1 maps of 4 channels, pooled or strided
    loop = MAML(_conv4(pool), n_way=3, feature_dim=dim, inner_lr=0.3, inner_steps=1).double()
    batched = MAML(_conv4(pool), n_way=3, feature_dim=dim, inner_lr=0.3, inner_steps=1, batch_tasks="on").double()
    batched.load_state_dict(loop.state_dict())
    _, _, ga = grads_of(loop, eps)
    _, _, gb = grads_of(batched, eps)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(batched.predict(eps), loop.predict(eps), rtol=1e-9, atol=1e-12)


def _conv4(pool=True, size=16):
    from fewshot_runner.backbones.conv import Conv4

    torch.manual_seed(0)
    return Conv4((1, size, size), hidden=4, pool=pool, fused_ops="auto")


def test_vmapped_predict_builds_no_outer_graph():
    maml = make_maml()
    maml.batch_tasks = "on"
    eps = make_episodes()
    with torch.no_grad():
        logits = maml.predict(eps)
    loop = make_maml()
    with torch.no_grad():
        expected = loop.predict(eps)
    assert not logits.requires_grad and all(p.grad is None for p in maml.parameters())
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)


def test_batch_tasks_auto_on_cpu_and_a_bad_value_is_refused():
    """auto on CPU: small tasks at once (grouped convolutions on Conv4; vmap on other nets without
    max-pool blocks), the loop otherwise (measured, docs/speed.md)."""
    small = make_episodes(n_tasks=2, n_way=5, n_shot=1, n_query=1, size=16)  # 10 images per task
    large = make_episodes(n_tasks=2, n_way=5, n_shot=1, n_query=15, size=16)  # 80
    strided = MAML(_conv4(pool=False), n_way=5, feature_dim=4, batch_tasks="auto")
    maxpool = MAML(_conv4(pool=True), n_way=5, feature_dim=4, batch_tasks="auto")
    assert strided.task_mode(small) == "groups" and strided.task_mode(large) == "off"
    assert maxpool.task_mode(small) == "groups" and maxpool.task_mode(large) == "off"
    assert not strided.runs_tasks_one_by_one(small) and maxpool.runs_tasks_one_by_one(large)
    strided.batch_tasks = "off"
    assert strided.task_mode(small) == "off"
    maxpool.batch_tasks = "on"
    assert maxpool.task_mode(large) == "on"
    with pytest.raises(UserError, match="batch_tasks"):
        MAML(SmoothConv(), n_way=3, feature_dim=12, batch_tasks="yes")
    with pytest.raises(UserError, match="batch_tasks=groups needs a Conv4 backbone"):
        MAML(SmoothConv(), n_way=3, feature_dim=12, batch_tasks="groups")


# ----------------------------------------------------------------------------- batch_tasks=groups
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("fused_ops", ["on", "off"])
@pytest.mark.parametrize("pool", [True, False], ids=["maxpool", "strided"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_grouped_tasks_give_the_loop_meta_gradient_in_float64(pool, fused_ops, first_order, channels_last):
    """device.batch_tasks=groups (each task's weights as the groups of grouped convolutions, one
    autograd.grad for every task's inner step, the fused batch-norm op and ops/conv.py's convolution,
    or the plain ops; NCHW or, as on CPU, channels-last) against the per-task loop (NCHW): same loss,
    meta-gradient and test-time predictions to 1e-9 in float64, 2 inner steps."""
    from fewshot_runner.backbones import use_channels_last
    from fewshot_runner.backbones.conv import Conv4

    eps = make_episodes(n_tasks=3, size=16)
    nets = []
    for mode in ("off", "groups"):
        torch.manual_seed(0)
        backbone = Conv4((1, 16, 16), hidden=4, pool=pool, fused_ops=fused_ops)
        nets.append(MAML(backbone, n_way=3, feature_dim=4, inner_lr=0.3, inner_steps=2, eval_inner_steps=3,
                         first_order=first_order, batch_tasks=mode).double())
    loop, grouped = nets
    if channels_last:
        use_channels_last(grouped)
    la, ma, ga = grads_of(loop, eps)
    lb, mb, gb = grads_of(grouped, eps)
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mb["acc"], ma["acc"])
    for (name, _), a, b in zip(loop.named_parameters(), ga, gb):
        if name.endswith("conv.bias"):  # removed by batch norm: an exact 0, up to rounding
            assert a.abs().max() < 1e-12 and b.abs().max() < 1e-12, name
            continue
        err = ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
        assert err < 1e-9, (name, err)
    with torch.no_grad():
        torch.testing.assert_close(grouped.predict(eps), loop.predict(eps), rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in grouped.parameters())
    # the fast path as it trains, in fp32, against the float64 meta-gradient: within 1e-3 (the bar)
    grouped.float()
    eps32 = Episode(eps.support_x.float(), eps.support_y, eps.query_x.float(), eps.query_y, eps.n_way)
    _, _, g32 = grads_of(grouped, eps32)
    for (name, _), a, b in zip(loop.named_parameters(), ga, g32):
        if not name.endswith("conv.bias"):
            err = ((b.double() - a).norm() / a.norm()).item()
            assert err < 1e-3, (name, err)
