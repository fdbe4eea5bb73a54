"""Reptile: its own outer step against the formula with hand-computed inner steps (float64), the annealed
outer step size, the grouped fast path, non-transductive scoring, and the CLI (smoke, eval, kill + resume)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_faults import records
from test_maml import SmoothConv, make_episodes

from conftest import RESUMABLE_STEPS, kill_and_resume, smoke_eval, smoke_train
from fewshot_runner.algorithms.reptile import Reptile, linear_anneal


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def make_reptile(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"inner_lr": 0.3, "inner_steps": 3, "eval_inner_steps": 2, **kw}
    return Reptile(SmoothConv(), n_way=3, feature_dim=12, **kw).double()


def by_hand(model: Reptile, eps, lr, steps, batches=None):
    """Each task: a copy of the net trained by torch.optim.SGD on its support + query images (all of them, or
    the given index batches per step); then theta + eps * mean(phi - theta) with eps as set by set_progress."""
    x = torch.cat([eps.support_x, eps.query_x], 1)
    y = torch.cat([eps.support_y, eps.query_y], 1)
    phis = []
    for t in range(eps.n_tasks):
        net = copy.deepcopy(model.net)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        for s in range(steps):
            idx = slice(None) if batches is None else batches[t][s]
            opt.zero_grad()
            F.cross_entropy(net(x[t][idx]), y[t][idx]).backward()
            opt.step()
        phis.append([p.detach() for p in net.parameters()])
    e = model.current_step_size()
    return [p.detach() + e * torch.stack([ph[i] - p.detach() for ph in phis]).mean(0)
            for i, p in enumerate(model.net.parameters())]


def test_reptile_outer_update_equals_the_formula_with_inner_steps_by_hand():
    eps = make_episodes(n_tasks=3)
    m = make_reptile(inner_batch=None)
    m.set_progress(3, 10)  # eps = 1 - 0.3
    expected = by_hand(m, eps, 0.3, 3)
    metrics = m.outer_step(eps, optimizer=None)
    assert metrics["outer_step_size"] == pytest.approx(0.7) and 0 <= metrics["acc"] <= 1
    for (name, p), e in zip(m.net.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14, msg=name)
    assert any(not torch.equal(p.detach(), q) for p, q in zip(make_reptile().net.parameters(), expected))


def test_reptile_inner_mini_batches_walk_a_random_permutation_of_each_task():
    """inner_batch=4 of a 12-image pool: step s uses positions 4s..4s+3 (mod 12) of each task's permutation,
    drawn from torch's global generator."""
    eps = make_episodes(n_tasks=2)  # 3-way, 2 shots + 2 queries: 12 images per task
    m = make_reptile(inner_batch=4, inner_steps=4)
    m.set_progress(0, 5)
    torch.manual_seed(7)
    perms = torch.rand(2, 12).argsort(1)
    batches = [[perms[t, [(4 * s + i) % 12 for i in range(4)]] for s in range(4)] for t in range(2)]
    expected = by_hand(m, eps, 0.3, 4, batches)
    torch.manual_seed(7)
    m.outer_step(eps, optimizer=None)
    for p, e in zip(m.net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


def test_reptile_outer_step_size_anneals_linearly_to_its_final_value():
    m = make_reptile(outer_step_size=1.0, outer_step_size_final=0.0)
    seen = []
    for step in range(4):
        m.set_progress(step, 4)
        seen.append(m.current_step_size())
    assert seen == [1.0, 0.75, 0.5, 0.25]
    assert linear_anneal(0.5, 0.1, 2, 4) == pytest.approx(0.3) and linear_anneal(1.0, 0.0, 4, 4) == 0.0


def test_reptile_grouped_inner_loops_equal_the_task_loop_in_float64():
    from fewshot_runner.backbones.conv import Conv4

    eps = make_episodes(n_tasks=3, size=16)
    after = []
    for mode in ("off", "groups"):
        torch.manual_seed(0)
        m = Reptile(Conv4((1, 16, 16), hidden=4, pool=True, fused_ops="off"), n_way=3, feature_dim=4, inner_lr=0.3,
                    inner_steps=3, inner_batch=5, batch_tasks=mode).double()
        m.set_progress(1, 4)
        torch.manual_seed(3)
        metrics = m.outer_step(eps, optimizer=None)
        after.append((metrics, [p.detach().clone() for p in m.parameters()]))
    (ma, pa), (mb, pb) = after
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-12) and ma["acc"] == pytest.approx(mb["acc"])
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_reptile_scores_each_query_with_the_support_set_alone_unless_transductive():
    eps = make_episodes(n_tasks=2)
    m = make_reptile()
    with torch.no_grad():
        logits = m.predict(eps)
        assert logits.shape == (2, 6, 3) and not logits.requires_grad
        flipped = eps.__class__(eps.support_x, eps.support_y, eps.query_x.flip(1), eps.query_y.flip(1), eps.n_way)
        torch.testing.assert_close(m.predict(flipped), logits.flip(1), rtol=1e-12, atol=1e-14)  # no query sees another
        m.transductive = True
        trans = m.predict(eps)
    assert not torch.allclose(trans, logits)  # batch statistics over all queries: a different score
    assert all(p.grad is None for p in m.parameters())


FAST = ["algo=reptile", "debug=smoke", "backbone.hidden=8", "device.threads=1", "algo.eval_inner_steps=3",
        "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]


RESUMABLE = [*FAST, *RESUMABLE_STEPS]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """`fewshot train algo=reptile debug=smoke` (4 steps, checkpoints at 2 and 4), run once for the tests below."""
    return smoke_train(tmp_path_factory.mktemp("reptile"), RESUMABLE)[0]


def test_reptile_smoke_train_then_eval(unbroken, tmp_path):
    rows = records(unbroken)
    assert [r["train/outer_step_size"] for r in rows if "train/outer_step_size" in r] == [1.0, 0.75, 0.5, 0.25]
    smoke_eval(unbroken, tmp_path, "algo.transductive=true", "algo.eval_inner_steps=2", "eval.n_episodes=6")


def test_reptile_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """Its own outer step, its eps schedule and its mini-batch permutations (torch's global generator):
    killed in step 3 (last.pt at 2), resumed with resume=auto, it ends bitwise equal to an unbroken run."""
    kill_and_resume(RESUMABLE, unbroken, tmp_path)
