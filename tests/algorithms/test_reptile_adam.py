"""Reptile with Adam in the inner loop (algo.inner_optimizer=adam, the paper's Omniglot setting): the inner steps
against a hand-written Adam (Kingma & Ba, Algorithm 1), the outer update against the formula with the Adam state
reset per task or carried from task to task (the paper's code), every execution path against the per-task loop
(float64), test time from the carried state, the state in the state dict, auto's choice, and the CLI."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_maml import SmoothConv, make_episodes

from conftest import run_cli
from fewshot_runner.algorithms.reptile import Reptile
from fewshot_runner.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

LR, B1, B2, EPS = 0.05, 0.9, 0.99, 1e-8  # beta1 != 0 so the first moment matters in the checks


def make_adam(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"inner_lr": LR, "inner_steps": 3, "eval_inner_steps": 2, "inner_optimizer": "adam", "inner_beta1": B1,
          "inner_beta2": B2, "inner_eps": EPS, "inner_state": "reset", **kw}
    return Reptile(SmoothConv(), n_way=3, feature_dim=12, **kw).double()


class HandAdam:
    """The textbook Adam, written out: t += 1; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    p -= lr * m_hat / (sqrt(v_hat) + eps) with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)."""

    def __init__(self, shapes, lr=LR, b1=B1, b2=B2, eps=EPS):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.v = [torch.zeros(s, dtype=torch.float64) for s in shapes]

    def step(self, params, grads):
        self.t += 1
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1 ** self.t)
            v_hat = self.v[i] / (1 - self.b2 ** self.t)
            out.append(p - self.lr * m_hat / (torch.sqrt(v_hat) + self.eps))
        return out


def hand_adapt(net, x, y, steps, adam, batches=None):
    """``steps`` steps of ``adam`` on a copy of ``net`` (nn.Module, its own forward), on all of x, y or the index
    batches given per step; the adapted parameter tensors."""
    net = copy.deepcopy(net)
    params = list(net.parameters())
    for s in range(steps):
        idx = slice(None) if batches is None else batches[s]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, new in zip(params, adam.step([p.detach() for p in params], grads)):
                p.copy_(new)
    return [p.detach().clone() for p in params]


def pools(eps):
    return torch.cat([eps.support_x, eps.query_x], 1), torch.cat([eps.support_y, eps.query_y], 1)


def test_inner_adam_steps_equal_a_hand_written_adam():
    """One task, outer step size 1: the new weights are the task's adapted weights after k = 4 Adam steps."""
    eps = make_episodes(n_tasks=1)
    m = make_adam(inner_batch=None, inner_steps=4, outer_step_size=1.0)
    m.set_progress(0, 10)
    x, y = pools(eps)
    expected = hand_adapt(m.net, x[0], y[0], 4, HandAdam([p.shape for p in m.net.parameters()]))
    m.outer_step(eps, optimizer=None)
    for (name, p), e in zip(m.net.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14, msg=name)
    plain_sgd = make_adam(inner_optimizer="sgd", inner_batch=None, inner_steps=4)
    plain_sgd.set_progress(0, 10)
    plain_sgd.outer_step(eps, optimizer=None)
    assert not torch.allclose(next(plain_sgd.net.parameters()), next(m.net.parameters()))  # not SGD's result


@pytest.mark.parametrize("state", ["reset", "carry"])
def test_reptile_outer_update_with_adam_inner_steps_equals_the_formula(state):
    """Two outer steps of 3 tasks, inner mini-batches of 4 of each 12-image pool: theta + eps * mean(phi - theta)
    with each phi from the hand-written Adam, fresh for every task (reset) or one Adam going on from task to task
    and from the first outer step to the second (carry, the paper's code); the carried moments and step count are
    the hand Adam's."""
    eps = make_episodes(n_tasks=3)
    m = make_adam(inner_batch=4, inner_steps=3, inner_state=state)
    x, y = pools(eps)
    shapes = [p.shape for p in m.net.parameters()]
    carried = HandAdam(shapes)
    for outer in range(2):
        m.set_progress(outer + 1, 4)
        torch.manual_seed(7 + outer)
        perms = torch.rand(3, 12).argsort(1)
        theta = [p.detach().clone() for p in m.net.parameters()]
        phis = []
        for t in range(3):
            batches = [perms[t, [(4 * s + i) % 12 for i in range(4)]] for s in range(3)]
            phis.append(hand_adapt(m.net, x[t], y[t], 3, carried if state == "carry" else HandAdam(shapes), batches))
        e = m.current_step_size()
        expected = [p + e * torch.stack([ph[i] - p for ph in phis]).mean(0) for i, p in enumerate(theta)]
        torch.manual_seed(7 + outer)
        metrics = m.outer_step(eps, optimizer=None)
        assert metrics["outer_step_size"] == pytest.approx(e) and 0 <= metrics["acc"] <= 1
        for (name, p), want in zip(m.net.named_parameters(), expected):
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14, msg=f"{name} step {outer}")
    if state == "carry":
        got = m.carried.get()
        assert got.step == carried.t == 2 * 3 * 3
        for i, k in enumerate(got.m):
            torch.testing.assert_close(got.m[k], carried.m[i], rtol=1e-12, atol=1e-16)
            torch.testing.assert_close(got.v[k], carried.v[i], rtol=1e-12, atol=1e-20)
    else:
        assert m.carried is None and not any("carried" in k for k in m.state_dict())


def test_test_time_adam_starts_every_task_from_the_carried_state_and_leaves_it():
    """predict: each task's support set, eval_inner_steps Adam steps from a copy of the carried state (the paper's
    code restores it after each test task), then the queries (transductive): a hand-written Adam from the same
    moments and step count gives the same logits; the carried state is unchanged."""
    eps = make_episodes(n_tasks=2)
    m = make_adam(inner_state="carry", eval_inner_steps=3, transductive=True)
    m.set_progress(0, 4)
    m.outer_step(eps, optimizer=None)  # a carried state with something in it
    before = {k: v.clone() for k, v in m.state_dict().items()}
    st = m.carried.get()
    expected = []
    for t in range(2):
        adam = HandAdam([p.shape for p in m.net.parameters()])
        adam.m, adam.v, adam.t = [st.m[k].clone() for k in st.m], [st.v[k].clone() for k in st.v], st.step
        phi = hand_adapt(m.net, eps.support_x[t], eps.support_y[t], 3, adam)
        net = copy.deepcopy(m.net)
        with torch.no_grad():
            for p, q in zip(net.parameters(), phi):
                p.copy_(q)
            expected.append(net(eps.query_x[t]))
    with torch.no_grad():
        logits = m.predict(eps)
    torch.testing.assert_close(logits, torch.stack(expected), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def conv_reptile(mode, state, seed=0, **kw):
    from fewshot_runner.backbones.conv import Conv4

    torch.manual_seed(seed)
    m = Reptile(Conv4((1, 16, 16), hidden=4, pool=False, fused_ops="off"), n_way=3, feature_dim=4, inner_lr=LR,
                inner_steps=3, inner_batch=5, eval_inner_steps=2, inner_optimizer="adam", inner_beta1=B1,
                inner_beta2=B2, inner_eps=EPS, inner_state=state, batch_tasks="off", **kw).double()
    m.batch_tasks = mode  # (after construction: carry refuses groups for training, not at test time)
    return m


def test_adam_training_grouped_equals_the_task_loop_in_float64():
    """Two outer steps, grouped against the loop: every weight equal to 1e-12, but the convolution biases.  Batch
    norm follows each convolution, so a bias's exact gradient is 0 and its exact Adam update 0; what each path
    computes is rounding noise g ~ 1e-17, which Adam turns into steps of lr * g / (|g| + inner_eps) ~ 1e-10 (Adam
    is 1 / inner_eps-sensitive near g = 0).  So those biases are checked for what is exact: both paths leave them
    within 1e-8 of where they started (the other weights move by ~0.1)."""
    eps = make_episodes(n_tasks=3, size=16)
    after = []
    for mode in ("off", "groups"):
        m = conv_reptile(mode, "reset")
        assert m.train_mode(eps) == mode
        start = {k: p.detach().clone() for k, p in m.named_parameters()}
        for outer in range(2):
            m.set_progress(outer, 4)
            torch.manual_seed(3 + outer)
            metrics = m.outer_step(eps, optimizer=None)
        after.append((metrics, {k: p.detach().clone() for k, p in m.named_parameters()}))
    (ma, pa), (mb, pb) = after
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-12) and ma["acc"] == pytest.approx(mb["acc"])
    for k in pa:
        if k.endswith("conv.bias"):
            for got in (pa[k], pb[k]):
                torch.testing.assert_close(got, start[k], rtol=0, atol=1e-8, msg=k)
        else:
            torch.testing.assert_close(pa[k], pb[k], rtol=1e-12, atol=1e-12, msg=k)
            assert (pa[k] - start[k]).abs().max() > 1e-3, k


@pytest.mark.parametrize("state", ["reset", "carry"])
@pytest.mark.parametrize("transductive", [True, False])
def test_adam_fine_tuning_paths_equal_the_task_loop_in_float64(state, transductive):
    """Test time: grouped convolutions and vmap give the loop's logits, from zero moments or the carried state."""
    eps = make_episodes(n_tasks=3, size=16)
    trained = conv_reptile("off", state)
    trained.set_progress(0, 4)
    torch.manual_seed(3)
    trained.outer_step(eps, optimizer=None)
    trained.transductive = transductive
    out = {}
    for mode in ("off", "groups", "on"):
        trained.batch_tasks = mode
        assert trained.task_mode(eps) == mode
        with torch.no_grad():
            out[mode] = trained.predict(eps)
    assert out["off"].shape == (3, 6, 3)
    for mode in ("groups", "on"):
        torch.testing.assert_close(out[mode], out["off"], rtol=1e-12, atol=1e-12, msg=mode)


def test_the_carried_state_is_in_the_state_dict_and_a_reload_goes_on_bitwise():
    """Two outer steps, the state dict into a fresh learner, two more steps on each: bitwise the same (what
    checkpoints and resume rely on); an SGD learner's state dict has no such entries (older checkpoints load)."""
    eps = make_episodes(n_tasks=2)
    a = make_adam(inner_state="carry", inner_batch=4)
    for step in range(2):
        a.set_progress(step, 4)
        a.outer_step(eps, optimizer=None)
    assert int(a.state_dict()["carried.step"]) == 2 * 2 * 3
    b = make_adam(inner_state="carry", inner_batch=4, seed=1)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        torch.manual_seed(11)
        for step in range(2, 4):
            m.set_progress(step, 4)
            m.outer_step(eps, optimizer=None)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not any(k.startswith("carried.") for k in make_adam(inner_optimizer="sgd").state_dict())


def test_a_non_finite_inner_loop_updates_neither_the_weights_nor_the_carried_state():
    """A NaN pixel in one task: the step reports a NaN loss (the engine then stops, or skips with train.on_nan=skip)
    and leaves the weights and the carried Adam state as they were (a NaN in the carried moments would stay)."""
    eps = make_episodes(n_tasks=2)
    m = make_adam(inner_state="carry")
    m.set_progress(0, 4)
    m.outer_step(eps, optimizer=None)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = eps.support_x.clone()
    bad[1, 0, 0, 0, 0] = float("nan")
    metrics = m.outer_step(eps.__class__(bad, eps.support_y, eps.query_x, eps.query_y, eps.n_way), optimizer=None)
    assert metrics["loss"] != metrics["loss"]  # NaN
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_auto_groups_reptiles_small_inner_steps_on_cpu():
    """device.batch_tasks=auto for training: grouped convolutions where each inner step takes few images per task
    (the paper's batches of 10 from a 50-image pool), the loop for whole-pool steps, for a carried Adam state
    (tasks in order) and for a backbone without grouped convolutions."""
    from fewshot_runner.backbones.conv import Conv4

    eps = make_episodes(n_tasks=2, n_way=5, n_shot=1, n_query=9, size=16)  # 50 images per task
    def conv(**kw):
        return Reptile(Conv4((1, 16, 16), hidden=4, pool=False), n_way=5, feature_dim=4, batch_tasks="auto", **kw)
    assert conv(inner_batch=10).train_mode(eps) == "groups"
    assert conv(inner_batch=10, inner_optimizer="adam", inner_state="reset").train_mode(eps) == "groups"
    assert conv(inner_batch=None).train_mode(eps) == "off"
    assert conv(inner_batch=10, inner_optimizer="adam", inner_state="carry").train_mode(eps) == "off"
    smooth = Reptile(SmoothConv(), n_way=5, feature_dim=12, inner_batch=10, batch_tasks="auto")
    assert smooth.train_mode(eps) == "off"


@pytest.mark.parametrize("kw, words", [
    ({"inner_optimizer": "adamw"}, "algo.inner_optimizer='adamw' is not one of sgd, adam"),
    ({"inner_optimizer": "adam", "inner_state": "keep"}, "algo.inner_state='keep' is not one of carry, reset"),
    ({"inner_optimizer": "adam", "inner_beta2": 1.0}, "must lie in [0, 1)"),
    ({"inner_optimizer": "adam", "batch_tasks": "groups"}, "use algo.inner_state=reset or device.batch_tasks=auto"),
])
def test_bad_adam_settings_are_refused_in_one_line(kw, words):
    from fewshot_runner.backbones.conv import Conv4

    with pytest.raises(UserError) as e:
        Reptile(Conv4((1, 16, 16), hidden=4), n_way=3, feature_dim=4, **kw)
    assert words in str(e.value) and "\n" not in str(e.value)


FAST = ["algo=reptile", "debug=smoke", "backbone.hidden=8", "device.threads=1", "algo.eval_inner_steps=3",
        "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3", "algo.inner_optimizer=adam",
        "algo.inner_lr=0.001", "train.steps=4", "train.ckpt_every=2", "train.val_every=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """`fewshot train algo=reptile debug=smoke algo.inner_optimizer=adam` (carried state; 4 steps, checkpoints at
    2 and 4), run once for the tests below."""
    root = tmp_path_factory.mktemp("reptile_adam")
    p = run_cli(["train", *FAST, f"hydra.run.dir={root / 'run'}"], root)
    assert p.returncode == 0, p.stderr[-2000:]
    return root / "run"


def test_reptile_adam_smoke_train_checkpoints_the_carried_state(unbroken):
    import json

    from fewshot_runner.engine import checkpoint as ckpt

    model = ckpt.load_checkpoint(unbroken / "checkpoints" / "last.pt")["model"]
    assert int(model["carried.step"]) == 4 * 2 * 5  # steps x meta-batch (smoke: 2) x inner steps
    assert float(model["carried.v_1_weight"].abs().sum()) > 0
    assert 0 <= json.loads((unbroken / "results.json").read_text())["test/acc"] <= 1


@pytest.mark.slow
def test_reptile_adam_checkpoint_evaluates(unbroken, tmp_path):
    """`fewshot eval` of the best checkpoint (its carried state loads with the weights), transductive."""
    import json

    ev = tmp_path / "ev"
    p = run_cli(["eval", f"checkpoint={unbroken / 'checkpoints' / 'best.pt'}", "algo.transductive=true",
                 "eval.n_episodes=6", "device=cpu", f"hydra.run.dir={ev}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 0 <= json.loads((ev / "results.json").read_text())["test/acc"] <= 1


@pytest.mark.slow
def test_reptile_adam_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """The carried Adam state in the checkpoint: killed in step 3 (last.pt at 2), resumed with resume=auto, the
    run ends bitwise equal to the unbroken one."""
    from test_faults import assert_same_run, fewshot, killed, ok, step_of

    run = tmp_path / "run"
    killed(fewshot([*FAST, f"hydra.run.dir={run}"], tmp_path, fault="kill@step:3"))
    assert step_of(run / "checkpoints" / "last.pt") == 2
    ok(fewshot([*FAST, f"hydra.run.dir={run}", "resume=auto"], tmp_path))
    assert_same_run(unbroken, run)
