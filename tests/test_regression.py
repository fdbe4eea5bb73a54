"""Regression through the whole runner (data=sinusoid): the gradient learners' MSE loss and meta-gradient
(float64, against finite differences and a by-hand inner loop), evaluation's mean MSE and its interval,
metrics that keep the lowest validation MSE, the adaptation picture, the CLI (train, eval, kill + resume
bitwise), a learner that cannot do regression refused in one line, and the sweep summary of MSEs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import one_error_line, run_cli
from fewshot_runner.algorithms.maml import MAML
from fewshot_runner.data.sinusoid import Sinusoid
from fewshot_runner.engine.device import Runtime
from fewshot_runner.engine.evaluate import evaluate, nonfinite_note, nonfinite_results

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 nets: one intra-op thread (tests/conftest.py)


def smooth_net(width=4):
    """A smooth twin of the 2 x 40 ReLU MLP (tanh), so that finite differences are valid."""
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())


def make_maml(inner_steps=2, batch_tasks="off", seed=0, **kw):
    torch.manual_seed(seed)
    m = MAML(smooth_net(), n_way=1, feature_dim=4, inner_lr=0.05, inner_steps=inner_steps, eval_inner_steps=3,
             batch_tasks=batch_tasks, **kw).double()
    m.set_task_kind("regression")
    return m


def tasks(n_tasks=3, n_shot=5, n_query=4, seed=0):
    return Sinusoid().split("train").episode_sampler(1, n_shot, n_query, seed=seed).sample(n_tasks).to("cpu",
                                                                                                       torch.float64)


def by_hand_meta_loss(m: MAML, eps) -> torch.Tensor:
    """The MAML objective written out: per task, inner SGD steps on the support MSE (mean over its points),
    then the query MSE; averaged over the tasks."""
    params = dict(m.net.named_parameters())
    losses = []
    for t in range(eps.n_tasks):
        fast = dict(params)
        for _ in range(m.inner_steps):
            pred = functional_call(m.net, fast, (eps.support_x[t],))[:, 0]
            support = ((pred - eps.support_y[t]) ** 2).sum() / eps.support_y.shape[1]
            grads = torch.autograd.grad(support, list(fast.values()), create_graph=True)
            fast = {k: v - m.inner_lr * g for (k, v), g in zip(fast.items(), grads)}
        pred = functional_call(m.net, fast, (eps.query_x[t],))[:, 0]
        losses.append(((pred - eps.query_y[t]) ** 2).sum() / eps.query_y.shape[1])
    return sum(losses) / len(losses)


def test_maml_on_sinusoid_optimises_the_mse_and_its_meta_gradient_matches_finite_differences():
    m, eps = make_maml(), tasks(n_tasks=2)
    loss, metrics = m.meta_loss(eps)
    assert set(metrics) == {"loss", "mse"} and float(metrics["mse"]) == float(loss.detach())
    assert torch.allclose(loss, by_hand_meta_loss(m, eps), rtol=1e-12, atol=0)
    params = list(m.parameters())
    grads = torch.autograd.grad(loss, params)
    h, worst = 1e-6, 0.0

    def loss_at(flat, i, value):
        with torch.no_grad():
            flat[i] = value
        return float(m.meta_loss(eps)[0].detach())

    for p, g in zip(params, grads):
        flat = p.data.view(-1)
        for i in range(flat.numel()):  # every weight of the small net
            kept = float(flat[i])
            fd = (loss_at(flat, i, kept + h) - loss_at(flat, i, kept - h)) / (2 * h)
            loss_at(flat, i, kept)
            worst = max(worst, abs(fd - float(g.view(-1)[i])) / max(1.0, abs(fd)))
    assert worst < 1e-7, worst
    # vmap over the tasks (device.batch_tasks=on): the same loss and meta-gradient
    v = make_maml(batch_tasks="on")
    v.load_state_dict(m.state_dict())
    loss_v, metrics_v = v.meta_loss(eps)
    assert set(metrics_v) == {"loss", "mse"} and torch.allclose(loss_v, loss, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(loss_v, list(v.parameters())), grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_adapted_predict_is_the_initialisation_at_zero_steps_and_predict_at_eval_inner_steps():
    m, eps = make_maml(), tasks(n_query=9)
    m.eval()
    with torch.no_grad():
        zero = m.adapted_predict(eps, 0)
        assert zero.shape == (3, 9, 1)
        assert torch.equal(zero, torch.stack([m.net(eps.query_x[t]) for t in range(3)]))
        assert torch.equal(m.adapted_predict(eps, m.eval_inner_steps), m.predict(eps))
        ten = m.adapted_predict(eps, 10)
    assert m.eval_inner_steps == 3  # restored
    # ten steps fit the support points better than none (the inner loop adapts the MSE)
    fit = lambda out, y: float(((out.squeeze(-1) - y) ** 2).mean())  # noqa: E731
    with torch.no_grad():
        s0 = m.adapted_predict(type(eps)(eps.support_x, eps.support_y, eps.support_x, eps.support_y, 1), 0)
        s10 = m.adapted_predict(type(eps)(eps.support_x, eps.support_y, eps.support_x, eps.support_y, 1), 10)
    assert fit(s10, eps.support_y) < fit(s0, eps.support_y)
    assert ten.shape == zero.shape


class LinearGuess(MAML):
    """A fixed 'learner' for the evaluation test: predicts 0.5 * x for every query point."""

    def predict(self, episodes):
        return 0.5 * episodes.query_x


def test_regression_evaluation_gives_the_mean_per_task_mse_and_its_95_interval():
    split = Sinusoid().split("test")
    learner = LinearGuess(smooth_net(), 1, 4, inner_steps=1, eval_inner_steps=1)
    learner.set_task_kind("regression")
    out = evaluate(learner, split, 1, 5, 20, 30, seed=7, chunk=7, runtime=Runtime(torch.device("cpu"), None, False))
    assert set(out) == {"mse", "ci95", "n_episodes"} and out["n_episodes"] == 30
    # independently: the first 30 tasks the test split's sampler draws for seed 7, scored here in float64
    ep = split.episode_sampler(1, 5, 20, seed=7).sample(30)
    per_task = ((0.5 * ep.query_x.squeeze(-1).double() - ep.query_y.double()) ** 2).mean(1)
    mean = float(per_task.mean())
    ci = 1.96 * math.sqrt(float(((per_task - mean) ** 2).sum()) / 29) / math.sqrt(30)
    assert out["mse"] == pytest.approx(mean, rel=1e-6) and out["ci95"] == pytest.approx(ci, rel=1e-5)


class DivergesOnSome(MAML):
    """A 'learner' whose adaptation 'diverges' (NaN, +inf) on the tasks whose first support x is below -2."""

    def predict(self, episodes):
        out = 0.5 * episodes.query_x
        first = episodes.support_x[:, 0, 0]
        out[first < -2.5] = float("nan")
        out[(first >= -2.5) & (first < -2)] = float("inf")
        return out


def test_a_test_with_diverged_tasks_keeps_its_nan_mean_and_says_how_many_and_the_median_of_the_rest():
    split = Sinusoid().split("test")
    learner = DivergesOnSome(smooth_net(), 1, 4, inner_steps=1, eval_inner_steps=1)
    learner.set_task_kind("regression")
    out = evaluate(learner, split, 1, 5, 20, 40, seed=7, chunk=7, runtime=Runtime(torch.device("cpu"), None, False))
    ep = split.episode_sampler(1, 5, 20, seed=7).sample(40)
    first = ep.support_x[:, 0, 0]
    bad = int((first < -2).sum())
    assert 0 < bad < 40 and out["n_nonfinite"] == bad and math.isnan(out["mse"])
    ok = first >= -2
    per_task = ((0.5 * ep.query_x.squeeze(-1).double() - ep.query_y.double()) ** 2).mean(1)[ok]
    assert out["finite_median"] == pytest.approx(float(per_task.median()), rel=1e-6)
    keys = nonfinite_results(out, "mse")
    assert keys == {"test/n_nonfinite": bad, "test/median_finite_mse": out["finite_median"]}
    note = nonfinite_note({"test/mse": out["mse"], "test/n_episodes": 40, **keys}, "mse")
    assert note.startswith(f"warning: {bad} of 40 test tasks gave a non-finite mse") and "\n" not in note
    assert nonfinite_results({"mse": 0.3, "n_episodes": 40}, "mse") == {}  # all finite: no keys, no line
    assert nonfinite_note({"test/mse": 0.3, "test/n_episodes": 40}, "mse") is None


@pytest.mark.parametrize("algo", ["maml", "fomaml", "metasgd", "anil", "reptile"])
def test_every_gradient_learner_trains_a_step_on_sinusoid_with_the_mse(compose_cfg, algo):
    from fewshot_runner.engine.build import build_dataset, build_learner, make_optimizer
    from fewshot_runner.engine.device import resolve_runtime
    from fewshot_runner.engine.outer_step import gradient_outer_step

    cfg = compose_cfg([f"algo={algo}", "data=sinusoid", "backbone=mlp_sinusoid", "debug=smoke",
                       "data.n_shot=5", "data.n_query=7", "data.train_n_query=5"])
    runtime = resolve_runtime(cfg.device)
    data = build_dataset(cfg.data)
    split = data.split("train")
    algo_ = build_learner(cfg, data.x_shape, 1, runtime, split.task_kind)
    assert algo_.task_kind == "regression"
    opt = make_optimizer(cfg, algo_)
    batch = algo_.batch_source(split, 1, 5, 5, seed=0).sample(3)
    before = [p.detach().clone() for p in algo_.parameters()]
    algo_.set_progress(0, 4)
    metrics = (algo_.outer_step(batch, opt) if algo_.has_own_outer_step()
               else gradient_outer_step(algo_, opt, batch, runtime, None, None, None, None))
    assert {"loss", "mse"} <= set(metrics) and "acc" not in metrics and math.isfinite(float(metrics["mse"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, algo_.parameters()))
    algo_.eval()
    with torch.no_grad():
        out = algo_.predict(data.split("test").episode_sampler(1, 5, 7, seed=0).sample(2))
    assert out.shape == (2, 7, 1) and torch.isfinite(out).all()


def test_a_learner_that_cannot_do_regression_is_refused_before_it_is_built(compose_cfg):
    from fewshot_runner.engine.build import build_learner
    from fewshot_runner.engine.device import resolve_runtime
    from fewshot_runner.errors import UserError

    cfg = compose_cfg(["algo=protonet", "data=sinusoid", "backbone=mlp_sinusoid", "debug=smoke"])
    with pytest.raises(UserError, match="cannot learn regression tasks") as e:
        build_learner(cfg, (1,), 1, resolve_runtime(cfg.device), "regression")
    assert "algo=maml" in str(e.value) and "\n" not in str(e.value)


def test_a_backbone_that_cannot_take_the_inputs_is_one_line(compose_cfg):
    from fewshot_runner.engine.build import build_learner
    from fewshot_runner.engine.device import resolve_runtime
    from fewshot_runner.errors import UserError

    cfg = compose_cfg(["algo=maml", "data=sinusoid", "backbone=conv4", "debug=smoke"])
    fragment = r"cannot take this data set's inputs of shape \(1,\).*backbone=mlp_sinusoid"
    with pytest.raises(UserError, match=fragment) as e:
        build_learner(cfg, (1,), 1, resolve_runtime(cfg.device), "regression")
    assert isinstance(e.value, RuntimeError)  # (still what predict.py catches to word it for the user's images)


def test_a_sweep_of_regression_runs_is_summarised_by_its_mse(tmp_path):
    from fewshot_runner.engine.sweep import print_summary, write_summary

    sweep = tmp_path / "sweep"
    for num, (lr, res) in enumerate([("0.01", {"val/best_mse": 0.51, "test/mse": 0.4321, "test/ci95": 0.05,
                                               "wall_time_s": 3.0}),
                                     ("0.1", {"val/best_mse": 0.9, "test/mse": 0.8765, "test/ci95": 0.07,
                                              "wall_time_s": 2.0})]):
        d = sweep / str(num)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- data=sinusoid\n- algo.inner_lr={lr}\n")
        (d / "results.json").write_text(json.dumps(res))
    s = write_summary(sweep, ["data=sinusoid", "algo.inner_lr=0.01,0.1"])
    assert s.metric == "mse" and [p.name for p in s.files] == ["summary.csv", "summary.md"]
    table = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["test/mse"], r["val/best_mse"]) for r in table] == [("0.4321", "0.51"), ("0.8765", "0.9")]
    assert "test/acc" not in table[0]
    md = (sweep / "summary.md").read_text()
    assert "test mse (lower is better)" in md and "0.4321 ± 0.0500" in md and "0.8765 ± 0.0700" in md
    print_summary(s)


# ----------------------------------------------------------------------------- the CLI
FAST = ["algo=maml", "data=sinusoid", "backbone=mlp", "debug=smoke", "eval.pictures=true", "backbone.hidden=[16,16]", "algo.inner_lr=0.01",
        "device.threads=1", "data.n_query=20", "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]
RESUMABLE = [*FAST, "train.steps=4", "train.ckpt_every=2", "train.val_every=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """`fewshot train algo=maml data=sinusoid backbone=mlp debug=smoke` (4 steps, checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("sinusoid")
    p = run_cli(["train", *RESUMABLE, f"hydra.run.dir={root / 'run'}"], root)
    assert p.returncode == 0, p.stderr[-2000:]
    return root / "run"


def test_smoke_train_writes_mse_results_keeps_the_lowest_val_mse_and_draws_the_picture(unbroken, tmp_path):
    res = json.loads((unbroken / "results.json").read_text())
    assert {"test/mse", "test/ci95", "val/best_mse"} <= set(res) and "test/acc" not in res and "val/best_acc" not in res
    assert (res["n_way"], res["n_shot"], res["n_query"]) == (1, 10, 20)
    rows = [json.loads(ln) for ln in (unbroken / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/mse" in r] == [1, 2, 3, 4] and not any("train/acc" in r for r in rows)
    val = [(r["val/mse"], r["step"]) for r in rows if "val/mse" in r]
    assert len(val) == 2 and res["best_step"] == min(val)[1] and res["val/best_mse"] == min(val)[0]
    assert (unbroken / "regression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = tmp_path / "ev"
    p = run_cli(["eval", f"checkpoint={unbroken / 'checkpoints' / 'best.pt'}", "algo.eval_inner_steps=10",
                 "eval.n_episodes=6", "device=cpu", f"hydra.run.dir={ev}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads((ev / "results.json").read_text())
    assert {"test/mse", "test/ci95"} <= set(out) and "test/acc" not in out and out["algo/eval_inner_steps"] == 10
    assert out["test/mse"] != res["test/mse"]  # 10 inner steps instead of 3: another figure
    assert (ev / "regression.png").exists() and "test mse" not in p.stderr and "mse" in p.stdout


@pytest.mark.slow  # two more CLI runs (~9 s idle): beyond the default tier's 30 s
def test_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """The task sampler's generator is checkpointed: killed in step 3 (last.pt at 2), resumed with resume=auto,
    the run ends bitwise equal to an unbroken one (metrics, both checkpoints, results)."""
    from test_faults import assert_same_run, fewshot, killed, ok, step_of

    run = tmp_path / "run"
    killed(fewshot([*RESUMABLE, f"hydra.run.dir={run}"], tmp_path, fault="kill@step:3"))
    assert step_of(run / "checkpoints" / "last.pt") == 2
    ok(fewshot([*RESUMABLE, f"hydra.run.dir={run}", "resume=auto"], tmp_path))
    assert_same_run(unbroken, run)


def test_protonet_on_sinusoid_exits_with_one_line(tmp_path):
    p = run_cli(["train", "algo=protonet", "data=sinusoid", "debug=smoke", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    one_error_line(p, "PrototypicalNetworks cannot learn regression tasks", "algo=maml")
