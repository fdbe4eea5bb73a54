"""ResNet-12 and WRN-28-10: full-size shapes (84x84x3 -> 640), DropBlock, a float64 MAML meta-gradient through a
tiny ResNet-12 (vmap = the per-task loop, and central finite differences), and a ProtoNet smoke run on the CLI."""

import json

import pytest
import torch

from conftest import run_cli
from fewshot_runner.algorithms.maml import MAML
from fewshot_runner.backbones.resnet import ResNet12, WideResNet, drop_block
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.mark.parametrize("make", [lambda: ResNet12((3, 84, 84)), lambda: WideResNet((3, 84, 84))],
                         ids=["resnet12", "wrn28_10"])
def test_full_size_backbones_give_640_features_of_84x84_colour_images(make):
    torch.manual_seed(0)
    net = make().eval()
    with torch.no_grad():
        x = torch.rand(1, 3, 84, 84)
        z = net(x)
        m = net.forward_map(x)
    assert z.shape == (1, 640) and torch.isfinite(z).all()
    assert m.shape == ((1, 640, 5, 5) if isinstance(net, ResNet12) else (1, 640, 21, 21))
    torch.testing.assert_close(z, m.mean((2, 3)))
    n_params = sum(p.numel() for p in net.parameters())
    # ResNet-12 (64-160-320-640): 12.4 M weights; WRN-28-10: 36.5 M (Zagoruyko & Komodakis)
    assert n_params == pytest.approx(12.4e6 if isinstance(net, ResNet12) else 36.5e6, rel=0.01)


def test_tiny_resnet12_layout_small_images_and_bad_settings():
    net = ResNet12((1, 28, 28), channels=[4, 4, 8, 8])
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 8)  # 28 -> 14 -> 7 -> 3 -> 1
    assert net.has_max_pool
    with pytest.raises(UserError, match="four positive widths"):
        ResNet12((1, 28, 28), channels=[4, 4, 8])
    with pytest.raises(UserError, match="drop_block"):
        ResNet12((1, 28, 28), drop_block={"rate": 1.5})
    with pytest.raises(UserError, match="6n \\+ 4"):
        WideResNet((3, 32, 32), depth=27)
    assert WideResNet((1, 16, 16), depth=10, widen_factor=1)(torch.rand(2, 1, 16, 16)).shape == (2, 64)


def test_drop_block_zeroes_whole_squares_keeps_the_sum_and_is_off_at_eval():
    torch.manual_seed(0)
    x = torch.ones(16, 8, 10, 10, dtype=torch.float64)
    out = drop_block(x, rate=0.2, size=3)
    zero = out == 0
    assert 0.1 < zero.double().mean() < 0.3  # about `rate` of the units
    torch.testing.assert_close(out.sum(), x.sum())  # the kept units are rescaled
    assert torch.unique(out[~zero]).numel() == 1
    # every dropped unit lies in a fully dropped 3x3 square
    windows = torch.nn.functional.max_pool2d((~zero).double(), 3, stride=1)  # 1 where a window keeps something
    covered = torch.nn.functional.max_pool2d(torch.nn.functional.pad(1 - windows, (2, 2, 2, 2)), 3, stride=1)
    assert torch.equal(covered.bool(), zero)
    net = ResNet12((1, 16, 16), channels=[4, 4, 8, 8], drop_block={"rate": 0.3, "size": 2, "blocks": [1]})
    xs = torch.rand(4, 1, 16, 16)
    net.eval()
    torch.testing.assert_close(net(xs), net(xs))
    net.train()
    torch.manual_seed(1)
    a = net(xs)
    torch.manual_seed(2)
    assert not torch.allclose(a, net(xs))


def episodes(n_tasks=2, n_way=3, n_shot=1, n_query=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_tasks, n_way * n_shot, 1, size, size, generator=g, dtype=torch.float64)
    xq = torch.randn(n_tasks, n_way * n_query, 1, size, size, generator=g, dtype=torch.float64)
    ys = torch.arange(n_way).repeat_interleave(n_shot).repeat(n_tasks, 1)
    yq = torch.arange(n_way).repeat_interleave(n_query).repeat(n_tasks, 1)
    return Episode(xs, ys, xq, yq, n_way)


def tiny_maml(batch_tasks):
    torch.manual_seed(0)
    return MAML(ResNet12((1, 16, 16), channels=[4, 4, 8, 8]), n_way=3, feature_dim=8, inner_lr=0.3, inner_steps=2,
                batch_tasks=batch_tasks).double()


def test_maml_meta_gradient_through_a_tiny_resnet12_matches_vmap_and_finite_differences():
    """Second-order MAML (2 inner steps) in float64: the per-task loop's meta-gradient equals vmap's (1e-10) and
    central finite differences (1e-6 relative; LeakyReLU and max-pool kinks are not crossed at h = 1e-6 here)."""
    eps = episodes()
    loop = tiny_maml("off")
    loss, _ = loop.meta_loss(eps)
    names = [n for n, _ in loop.named_parameters()]
    grads = torch.autograd.grad(loss, list(loop.parameters()))
    vm = tiny_maml("on")
    loss_v, _ = vm.meta_loss(eps)
    torch.testing.assert_close(loss_v, loss, rtol=1e-12, atol=1e-14)
    for n, a, b in zip(names, grads, torch.autograd.grad(loss_v, list(vm.parameters()))):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=n)
    h, fds, ans = 1e-6, [], []
    params = list(loop.parameters())
    gen = torch.Generator().manual_seed(0)
    picks = [(j, int(torch.randint(params[j].numel(), (), generator=gen))) for j in
             torch.randperm(len(params), generator=gen)[:20].tolist()]  # 20 weights of 20 different tensors
    with torch.no_grad():
        for j, i in picks:
            flat = params[j].view(-1)
            orig = flat[i].item()
            flat[i] = orig + h
            with torch.enable_grad():
                lp = loop.meta_loss(eps)[0].item()
            flat[i] = orig - h
            with torch.enable_grad():
                lm = loop.meta_loss(eps)[0].item()
            flat[i] = orig
            fds.append((lp - lm) / (2 * h))
            ans.append(grads[j].view(-1)[i].item())
    fd, an = torch.tensor(fds, dtype=torch.float64), torch.tensor(ans, dtype=torch.float64)
    rel = ((fd - an).norm() / an.norm()).item()
    print("relative error", rel)
    assert rel < 1e-6, rel


def test_maml_on_a_tiny_wide_resnet_vmap_equals_the_per_task_loop():
    """WRN has no max-pool, so device.batch_tasks=auto runs it under vmap on CPU: the same meta-gradient as the loop
    (float64, second order, WRN-10-1: one block per group, 64 features)."""
    eps = episodes(size=8)
    out = []
    for mode in ("off", "on"):
        torch.manual_seed(0)
        m = MAML(WideResNet((1, 8, 8), depth=10, widen_factor=1), n_way=3, feature_dim=64, inner_lr=0.3, inner_steps=2,
                 batch_tasks=mode).double()
        loss, _ = m.meta_loss(eps)
        out.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    (la, ga), (lb, gb) = out
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-14)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert all(g.abs().max() > 0 for g in ga)


def test_protonet_trains_on_resnet12_from_the_cli(tmp_path):
    run = tmp_path / "run"
    p = run_cli(["train", "algo=protonet", "backbone=resnet12", "backbone.channels=[8,8,8,8]", "debug=smoke",
                 "data.image_size=16", "device.threads=1", "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3",
                 f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 0 <= json.loads((run / "results.json").read_text())["test/acc"] <= 1
