"""MAML++: its meta-gradient against finite differences (float64), the multi-step loss schedule, the switch of
derivative order, each switch off = MAML, per-step batch norm by hand, the three executions, and the CLI."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_adaptation import _fd_rel_error
from test_faults import records
from test_maml import SmoothConv, make_episodes
from torch import nn

from conftest import RESUMABLE_STEPS, kill_and_resume, one_error_line, run_cli, smoke_eval, smoke_train
from fewshot_runner.algorithms.maml import MAML
from fewshot_runner.algorithms.mamlpp import MAMLPlusPlus, msl_weights
from fewshot_runner.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

OFF = {"multi_step_loss": False, "lslr": False, "per_step_bn_weights": False, "per_step_bn_stats": False,
       "first_order_until": 0}


def make_mamlpp(seed=0, randomise=True, backbone=None, feature_dim=12, **kw):
    """A float64 MAML++ on SmoothConv; ``randomise``: learned rates and per-step batch-norm rows that differ per
    step and element (so a wrong index or broadcast shows)."""
    torch.manual_seed(seed)
    kw = {"inner_lr": 0.3, "inner_steps": 2, "eval_inner_steps": 2, "msl_steps": 10, "first_order_until": 0, **kw}
    m = MAMLPlusPlus(backbone or SmoothConv(), n_way=3, feature_dim=feature_dim, **kw).double()
    if randomise:
        with torch.no_grad():
            for r in m.inner_lrs.values():
                r.uniform_(0.1, 0.5)
            for norm in m.norms.values():
                if norm.weights:
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.uniform_(-0.5, 0.5)
    return m


def grads(m, eps):
    return torch.autograd.grad(m.meta_loss(eps)[0], list(m.parameters()))


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- the meta-gradient
def test_mamlpp_meta_gradient_matches_finite_differences():
    """Multi-step loss (annealed weights), LSLR, per-step batch-norm weights and running statistics, second order,
    2 inner steps: theta, the rates and the per-step rows against central differences, 1e-6 relative."""
    m = make_mamlpp()
    m.set_progress(3, 100)  # 3 of msl_steps=10: weights 0.35 / 0.65
    assert m.msl_active() and m.second_order()
    torch.testing.assert_close(m.msl_w, torch.tensor([0.35, 0.65], dtype=torch.float64), rtol=0, atol=1e-15)
    eps = make_episodes()
    err = _fd_rel_error(m, lambda: m.meta_loss(eps)[0])
    assert err < 1e-6, err
    g = dict(zip([n for n, _ in m.named_parameters()], grads(m, eps)))
    for name, v in g.items():  # every rate and every per-step row is meta-learned
        if name.startswith("inner_lrs.") or name.startswith("norms."):
            assert all(float(row.abs().max()) > 0 for row in v.reshape(v.shape[0], -1)), name


def test_msl_weights_follow_the_papers_schedule():
    """The paper's code, written out: each earlier step's weight falls from 1/S by epoch/(S * msl_epochs) to a floor
    of 0.03/S, the last rises by (S-1) times that to at most 1 - (S-1) * 0.03/S; the weights sum to 1."""
    s, msl_epochs = 5, 10
    for epoch in range(msl_epochs):
        decay = 1 / s / msl_epochs
        expected = [max(1 / s - epoch * decay, 0.03 / s)] * (s - 1)
        expected.append(min(1 / s + epoch * (s - 1) * decay, 1 - (s - 1) * 0.03 / s))
        got = msl_weights(s, epoch / msl_epochs)
        assert got == pytest.approx(expected, abs=1e-15) and sum(got) == pytest.approx(1.0, abs=1e-12)
    assert msl_weights(5, 0.0) == pytest.approx([0.2] * 5)
    assert msl_weights(5, 0.999) == pytest.approx([0.006] * 4 + [0.976])
    # the learner: msl_steps=null anneals over train.steps // 10, then the last step alone
    m = make_mamlpp(msl_steps=None, inner_steps=5, eval_inner_steps=5)
    m.set_progress(5, 100)
    assert m.msl_span() == 10 and m.msl_active()
    torch.testing.assert_close(m.msl_w, torch.tensor(msl_weights(5, 0.5), dtype=torch.float64))
    m.set_progress(10, 100)
    assert not m.msl_active()
    assert not make_mamlpp(multi_step_loss=False).msl_active()


def test_multi_step_loss_is_the_weighted_sum_of_each_steps_query_loss():
    """With MSL on, the loss of a 3-step model equals sum_k w_k x the last-step loss of a (k+1)-step model with MSL
    off holding the first k+1 rows of its rates and per-step batch norm (the query after step k uses row k)."""
    eps = make_episodes()
    m = make_mamlpp(inner_steps=3, eval_inner_steps=3, per_step_bn_stats=False)
    m.set_progress(4, 100)
    w = msl_weights(3, 0.4)
    total = 0.0
    for k in range(3):
        one = make_mamlpp(inner_steps=k + 1, eval_inner_steps=k + 1, multi_step_loss=False, per_step_bn_stats=False)
        state = {n: (v[: k + 1] if n.startswith(("inner_lrs.", "norms.")) else v) for n, v in m.state_dict().items()}
        one.load_state_dict(state)
        total += w[k] * float(one.meta_loss(eps)[0].detach())
    assert float(m.meta_loss(eps)[0].detach()) == pytest.approx(total, rel=1e-12)


# ----------------------------------------------------------------------------- switches
def maml_twin(first_order=False, seed=0):
    torch.manual_seed(seed)
    return MAML(SmoothConv(), n_way=3, feature_dim=12, inner_lr=0.3, inner_steps=2, first_order=first_order).double()


def test_derivative_order_is_first_order_before_first_order_until_and_second_order_from_it():
    eps = make_episodes()
    m = make_mamlpp(**{**OFF, "first_order_until": 5})
    first, second = grads(maml_twin(first_order=True), eps), grads(maml_twin(), eps)
    assert max(rel(a, b) for a, b in zip(first, second)) > 1e-4  # the two orders differ on this net
    for step, expected in ((0, first), (4, first), (5, second), (50, second)):
        m.set_progress(step, 100)
        for a, b in zip(grads(m, eps), expected):
            assert rel(a, b) < 1e-10 or float((a - b).abs().max()) < 1e-14, step
    m.first_order_until = None  # null: the first half of train.steps
    m.set_progress(49, 100)
    assert not m.second_order()
    m.set_progress(50, 100)
    assert m.second_order()


def test_all_switches_off_is_maml_and_each_switch_changes_the_meta_gradient():
    eps = make_episodes()
    expected = grads(maml_twin(), eps)
    off = make_mamlpp(**OFF)
    assert not list(off.norms.parameters()) and not list(off.inner_lrs.parameters())
    for a, b in zip(grads(off, eps), expected):
        assert rel(a, b) < 1e-10 or float((a - b).abs().max()) < 1e-14
    by_name = dict(zip([n for n, _ in maml_twin().named_parameters()], expected))
    for switch in ("multi_step_loss", "lslr", "per_step_bn_weights"):
        m = make_mamlpp(**{**OFF, switch: True})
        names, net = zip(*m.net.named_parameters())
        g = torch.autograd.grad(m.meta_loss(eps)[0], net)
        convs = [rel(a, by_name["net." + n]) for n, a in zip(names, g) if "conv" in n and "weight" in n]
        assert max(convs) > 1e-4, switch


def test_neutral_settings_of_lslr_and_running_statistics_give_mamls_meta_gradient():
    """LSLR with every rate at MAML's inner_lr, and per-step running statistics (training normalises with the
    batch statistics): MAML's meta-gradient to 1e-10; the statistics were updated, row by row."""
    eps = make_episodes()
    expected = grads(maml_twin(), eps)
    for switch in ("lslr", "per_step_bn_stats"):
        m = make_mamlpp(randomise=False, **{**OFF, switch: True})
        with torch.no_grad():
            for r in m.inner_lrs.values():
                r.fill_(0.3)  # (the rates were made in float32: 0.3 exactly in float64 here)
        g = torch.autograd.grad(m.meta_loss(eps)[0], list(m.net.parameters()))
        for a, b in zip(g, expected):
            assert rel(a, b) < 1e-10 or float((a - b).abs().max()) < 1e-14, switch
    for norm in m.norms.values():
        assert not torch.equal(norm.running_mean[0], torch.zeros_like(norm.running_mean[0]))
        assert not torch.equal(norm.running_mean[0], norm.running_mean[1])


def test_per_step_batch_norm_weights_with_equal_rows_are_maml_with_batch_norm_not_adapted():
    """BNWB alone, every row at the batch norms' initial gamma / beta: the meta-gradient of MAML whose batch-norm
    parameters do not adapt (test_adaptation's learner with its keys and every rate at inner_lr), and each
    shared gamma / beta gets the sum of its rows' meta-gradients (1e-10, float64)."""
    from test_adaptation import LearnedRates

    eps = make_episodes()
    m = make_mamlpp(randomise=False, **{**OFF, "per_step_bn_weights": True})
    torch.manual_seed(0)
    ref = LearnedRates(SmoothConv(), 3, 12, inner_steps=2, keys=[n for n, _ in m.net.named_parameters()],
                       init=0.3).double()
    with torch.no_grad():
        for r in ref.rates.values():
            r.fill_(0.3)
    got = dict(zip([n for n, _ in m.named_parameters()], grads(m, eps)))
    want = dict(zip([n for n, _ in ref.net.named_parameters()],
                    torch.autograd.grad(ref.meta_loss(eps)[0], list(ref.net.parameters()))))
    for name, g in want.items():
        if "bn" in name:  # net.0.bn1.weight -> the rows norms.0__bn1.weight, summed
            mod, kind = name.rsplit(".", 1)
            g_rows = got[f"norms.{mod.replace('.', '__')}.{kind}"].sum(0)
            assert rel(g_rows, g) < 1e-10, name
        else:
            assert rel(got[f"net.{name}"], g) < 1e-10 or float((got[f"net.{name}"] - g).abs().max()) < 1e-14, name


# ----------------------------------------------------------------------------- per-step batch norm by hand
def by_hand(m: MAMLPlusPlus, ep, steps: int, train: bool, stats: bool = True):
    """One task with an ordinary deep copy of the net: before inner step k its batch norms get row k of the
    per-step gamma / beta / running statistics (train: batch statistics, updating the rows; else the rows
    used; ``stats=False``: no running statistics, batch statistics), a plain backward and an SGD step at rate
    lr[k] per tensor; the query after step k (train) or after the last (test) uses row k too.  Returns the last
    query logits and the rows after."""
    net = copy.deepcopy(m.net).train(train)
    rows = {k: {b: norm.running_mean.clone() if b == "mean" else norm.running_var.clone() for b in ("mean", "var")}
            for k, norm in m.norms.items()}
    names, adapted = zip(*net.named_parameters())  # (the batch norms hold no parameters of their own)
    out = None
    for k in range(steps):
        for key, norm in m.norms.items():
            bn = net.get_submodule(m.norm_names[key])
            bn.weight = nn.Parameter(norm.weight[k].detach().clone(), requires_grad=False)
            bn.bias = nn.Parameter(norm.bias[k].detach().clone(), requires_grad=False)
            if stats:
                bn.running_mean, bn.running_var = rows[key]["mean"][k], rows[key]["var"][k]  # views: updated in place
        loss = F.cross_entropy(net(ep.support_x), ep.support_y)
        g = torch.autograd.grad(loss, adapted)
        with torch.no_grad():
            for p, gp, name in zip(adapted, g, names):
                p -= m.inner_lrs[name.replace(".", "__")][k] * gp
        if train or k == steps - 1:
            with torch.no_grad():
                out = net(ep.query_x)
    return out, rows


def test_per_step_batch_norm_by_hand_in_training_and_at_test():
    m = make_mamlpp(inner_steps=2)
    eps = make_episodes(n_tasks=1)
    ep = eps.task(0)
    # training: every forward of inner step k (support, and the query after it) updates row k
    _, rows = by_hand(m, ep, 2, train=True)
    m.set_progress(0, 100)
    m.meta_loss(eps)
    for key, norm in m.norms.items():
        torch.testing.assert_close(norm.running_mean, rows[key]["mean"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(norm.running_var, rows[key]["var"], rtol=1e-12, atol=1e-14)
    assert not torch.equal(norm.running_var[0], norm.running_var[1])
    # test time, eval_bn=running: the rows normalise, nothing is updated, each query is scored alone
    before = [b.clone() for b in m.norms.buffers()]
    m.eval_bn = "running"
    expected, _ = by_hand(m, ep, 2, train=False)
    with torch.no_grad():
        logits = m.predict(eps)  # (predict evaluates as at test in training mode too)
        torch.testing.assert_close(logits[0], expected, rtol=1e-10, atol=1e-12)
        flipped = eps.__class__(eps.support_x, eps.support_y, eps.query_x.flip(1), eps.query_y.flip(1), eps.n_way)
        torch.testing.assert_close(m.predict(flipped), logits.flip(1), rtol=1e-12, atol=1e-14)
    # eval_bn=batch (the default, the paper's code): each set's batch statistics, the rows neither used nor updated
    m.eval_bn = "batch"
    expected, _ = by_hand(m, ep, 2, train=False, stats=False)
    with torch.no_grad():
        batch = m.eval().predict(eps)
    torch.testing.assert_close(batch[0], expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(batch, logits)
    assert all(torch.equal(a, b) for a, b in zip(m.norms.buffers(), before))
    assert not logits.requires_grad and all(p.grad is None for p in m.parameters())


# ----------------------------------------------------------------------------- executions
def conv4():
    from fewshot_runner.backbones.conv import Conv4

    torch.manual_seed(1)
    return Conv4((1, 16, 16), hidden=4, pool=False, fused_ops="auto")


@pytest.mark.parametrize("mode", ["on", "groups"])
def test_vmap_and_grouped_convolutions_give_the_loops_meta_gradient_and_predictions(mode):
    """MSL, LSLR and per-step batch-norm weights (no running statistics) in float64: 1e-9 of the loop."""
    eps = make_episodes(n_tasks=3, size=16)
    out = {}
    for m_ in ("off", mode):
        m = make_mamlpp(backbone=conv4(), feature_dim=4, batch_tasks=m_, per_step_bn_stats=False)
        m.set_progress(2, 100)
        assert m.task_mode(eps) == m_
        out[m_] = grads(m, eps), m.predict(eps)
    for a, b in zip(out[mode][0], out["off"][0]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), mode
    torch.testing.assert_close(out[mode][1], out["off"][1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_running_statistics_are_the_same_through_the_fused_batch_norm_ops(channels_last):
    """Conv4 with max-pool: the fused BN+ReLU+pool op (and, channels-last, the fused first-layer op) updates the
    per-step rows as the plain ops do, and the rows then score the same at test time (float64)."""
    from fewshot_runner.backbones import use_channels_last
    from fewshot_runner.backbones.conv import Conv4

    eps = make_episodes(n_tasks=2, size=16)
    ms = []
    for fused in ("off", "on"):
        torch.manual_seed(1)
        m = make_mamlpp(backbone=Conv4((1, 16, 16), hidden=4, pool=True, fused_ops=fused), feature_dim=4)
        if fused == "on" and channels_last:
            use_channels_last(m)
        m.set_progress(0, 100)
        m.meta_loss(eps)
        ms.append(m)
    for a, b in zip(ms[0].norms.buffers(), ms[1].norms.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert not torch.equal(ms[0].norms["0__blocks__0__bn"].running_var[1], torch.ones(4, dtype=torch.float64))
    ms[0].eval_bn = ms[1].eval_bn = "running"
    with torch.no_grad():
        torch.testing.assert_close(ms[1].eval().predict(eps), ms[0].eval().predict(eps), rtol=1e-9, atol=1e-12)


def test_running_statistics_run_the_loop_in_one_thread_and_settings_are_checked():
    m = make_mamlpp(backbone=conv4(), feature_dim=4, batch_tasks="groups")
    eps = make_episodes(n_tasks=2, size=16)
    assert m.task_mode(eps) == "off" and not m.runs_tasks_one_by_one(eps)
    assert "one thread" in m.execution_notes(2)["task execution"]
    with pytest.raises(UserError, match="algo.eval_inner_steps=3 is more than algo.inner_steps=2"):
        make_mamlpp(eval_inner_steps=3)
    make_mamlpp(eval_inner_steps=3, **OFF)  # nothing per step: any number of test-time steps
    with pytest.raises(UserError, match="algo.msl_steps=-1"):
        make_mamlpp(msl_steps=-1)
    with pytest.raises(UserError, match="algo.eval_bn='train' is not batch or running"):
        make_mamlpp(eval_bn="train")
    with pytest.raises(UserError, match="algo.eval_bn=running needs the per-step running statistics"):
        make_mamlpp(eval_bn="running", per_step_bn_stats=False)
    m.eval_bn = "running"  # evaluation with the rows: the loop; with batch statistics: the execution asked for
    assert m.eval().task_mode(eps) == "off"
    m.eval_bn = "batch"
    assert m.task_mode(eps) == "groups" and m.train().task_mode(eps) == "off"
    assert len(m.param_groups()) == 1
    own = make_mamlpp(rates_lr=1e-4)
    groups = own.param_groups()
    assert groups[1]["lr"] == 1e-4 and len(groups[1]["params"]) == len(list(own.inner_lrs.parameters()))
    assert sum(len(g["params"]) for g in groups) == len(list(own.parameters()))
    assert MAMLPlusPlus.eval_settings == ("eval_inner_steps", "eval_bn")


def test_a_captured_training_step_is_captured_again_when_the_schedules_change_its_graph():
    """device.cuda_graphs replays the graph of its capture: the switch to second order (step 2) and the end of the
    multi-step loss (step 3) must each make the engine capture again (emulated on CPU, tests/test_cuda_graphs.py)."""
    from test_cuda_graphs import CPU, EagerEmulation

    from fewshot_runner.engine.graphs import GraphedStep
    from fewshot_runner.engine.outer_step import gradient_outer_step

    m = make_mamlpp(first_order_until=2, msl_steps=3)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    backend = EagerEmulation()
    graphed = GraphedStep(m, CPU, backend)
    captures = []
    for step in range(5):
        m.set_progress(step, 5)
        gradient_outer_step(m, opt, make_episodes(seed=step), CPU, None, None, None, graphed)
        captures.append(backend.captures)
    assert captures == [1, 1, 2, 3, 3]


# ----------------------------------------------------------------------------- the CLI
RESUMABLE = ["algo=mamlpp", "debug=smoke", "backbone.hidden=8", "device.threads=1", "algo.inner_steps=2",
             "algo.eval_inner_steps=2", "algo.msl_steps=3", "algo.first_order_until=2",
             "algo.per_step_bn_stats=true",  # (off by default: the paper's BNRS, checkpointed and resumed here)
             *RESUMABLE_STEPS,
             "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """`fewshot train algo=mamlpp debug=smoke` (4 steps: MSL until step 3, second order from step 2, cosine lr)."""
    return smoke_train(tmp_path_factory.mktemp("mamlpp"), RESUMABLE)[0]


def test_mamlpp_smoke_train_then_eval(unbroken, tmp_path):
    best = unbroken / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)["model"]
    assert state["norms.0__blocks__0__bn.running_mean"].shape == (2, 8)  # per-step statistics travel
    assert state["inner_lrs.1__weight"].shape == (2,) and not torch.equal(state["inner_lrs.1__weight"],
                                                                          torch.full((2,), 0.1))
    rows = records(unbroken)
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    assert lrs[0] > lrs[-1]  # cosine
    smoke_eval(unbroken, tmp_path, "algo.eval_inner_steps=1", "algo.eval_bn=running", "eval.n_episodes=6")
    p = run_cli(["eval", f"checkpoint={best}", "algo.eval_inner_steps=3", "device=cpu",
                 f"hydra.run.dir={tmp_path / 'x'}"], tmp_path)
    one_error_line(p, "algo.eval_inner_steps=3")


@pytest.mark.slow  # two more training runs (~25 s of CPU): over the default tier's budget
def test_mamlpp_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """Killed in step 3 (last.pt at 2), resumed with resume=auto: bitwise the unbroken run (the per-step running
    statistics are buffers of the model; the schedules follow the step the engine restores)."""
    kill_and_resume(RESUMABLE, unbroken, tmp_path)
