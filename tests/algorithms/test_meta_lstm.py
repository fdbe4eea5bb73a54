"""The LSTM meta-learner (Ravi & Larochelle 2017): its update against the cell-state formula with hand-set gates
(float64), the preprocessing formula, detached learner gradients, meta-gradients reaching every meta-parameter,
the per-episode batch-norm statistics at test time, and the CLI (smoke, eval, kill + resume)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_faults import records
from test_maml import SmoothConv, make_episodes

from conftest import RESUMABLE_STEPS, kill_and_resume, smoke_eval, smoke_train
from fewshot_runner.algorithms.meta_lstm import LSTMMetaLearner, preprocess
from fewshot_runner.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

F_GATE, I_GATE = 0.8, 0.05


def make_learner(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"inner_steps": 3, "eval_inner_steps": 3, **kw}
    return LSTMMetaLearner(SmoothConv(), n_way=3, feature_dim=12, **kw).double()


def set_gates(m, f=F_GATE, i=I_GATE):
    """Zero the second layer's weights, so f_t = sigmoid(b_F) = f and i_t = sigmoid(b_I) = i at every step."""
    with torch.no_grad():
        m.cell.weight_f.zero_()
        m.cell.weight_i.zero_()
        m.cell.bias_f.fill_(math.log(f / (1 - f)))
        m.cell.bias_i.fill_(math.log(i / (1 - i)))


def net_with(m, theta):
    """A deep copy of the learner net holding the flat weights theta (its own plain nn.Modules)."""
    net = copy.deepcopy(m.net)
    with torch.no_grad():
        for (_, p), v in zip(net.named_parameters(), m.unflatten(theta).values()):
            p.copy_(v)
    return net


def flat_c0(m):
    return torch.cat([p.detach().reshape(-1) for p in m.net.parameters()])


def by_hand(m, x, y, steps, second_order=False):
    """theta_t = f * theta_{t-1} - i * grad L(theta_{t-1}) on the support set, from c_0 (grads by plain
    autograd on a flat vector; second_order keeps their graph, as an implementation that did not detach)."""
    c0 = torch.cat([p.reshape(-1) for p in m.net.parameters()])
    theta = c0
    for _ in range(steps):
        loss = F.cross_entropy(torch.func.functional_call(m.net, m.unflatten(theta), (x,)), y)
        (g,) = torch.autograd.grad(loss, theta, create_graph=second_order)
        theta = F_GATE * theta - I_GATE * g
    return theta


def test_preprocessing_is_log_magnitude_and_sign_above_e_minus_p_else_minus_one_and_scaled_value():
    p = 10.0
    xs = [2.0, -0.5, 1e-3, -3e-4, 1e-5, -2e-6, 0.0]
    got = preprocess(torch.tensor(xs, dtype=torch.float64), p)
    for x, row in zip(xs, got.tolist()):
        if abs(x) >= math.exp(-p):  # e^-10 = 4.54e-5
            expected = [math.log(abs(x)) / p, math.copysign(1.0, x)]
        else:
            expected = [-1.0, x * math.exp(p)]
        assert row == pytest.approx(expected, rel=1e-15, abs=1e-15), x
    # p moves the threshold: e^-5 = 6.7e-3
    assert preprocess(torch.tensor(1e-2, dtype=torch.float64), 5.0).tolist() == pytest.approx([math.log(1e-2) / 5, 1])
    assert preprocess(torch.tensor(1e-3, dtype=torch.float64), 5.0).tolist() == pytest.approx([-1, 1e-3 * math.exp(5)])


def test_learner_update_equals_the_cell_state_formula_for_hand_set_gates():
    """f_t, i_t fixed by the gate biases: theta_t = f theta_{t-1} - i grad_t exactly (float64), and the gates
    the learner reports are those constants."""
    m = make_learner()
    set_gates(m)
    ep = make_episodes(n_tasks=1).task(0)
    with torch.no_grad():  # (as at test time: learn() enables autograd for the learner's gradients only)
        theta, gates = m.learn(ep.support_x, ep.support_y, 4, m.fresh_buffers(ep.support_x))
    expected = by_hand(m, ep.support_x, ep.support_y, 4).detach()
    torch.testing.assert_close(theta, expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(theta, flat_c0(m))  # the learner moved
    assert gates["forget_gate"].item() == pytest.approx(F_GATE, rel=1e-12)
    assert gates["input_gate"].item() == pytest.approx(I_GATE, rel=1e-12)


def test_learner_gradients_are_inputs_without_a_graph():
    """With hand-set gates theta_T = f^T c_0 - sum_t i f^(T-t) grad_t; the grads being constants, the meta-gradient
    of c_0 is f^T dL_query/dtheta_T.  An implementation that back-propagated through the learner's gradients
    would add Hessian terms: computed here, they change it by far more than the tolerance."""
    m = make_learner()
    set_gates(m)
    steps = 3
    eps = make_episodes(n_tasks=1)
    loss, _ = m.meta_loss(eps)
    got = torch.autograd.grad(loss, list(m.net.parameters()))
    got = torch.cat([g.reshape(-1) for g in got])
    ep = eps.task(0)
    theta_T = by_hand(m, ep.support_x, ep.support_y, steps).detach().requires_grad_()
    q = F.cross_entropy(torch.func.functional_call(m.net, m.unflatten(theta_T), (ep.query_x,)), ep.query_y)
    (dq,) = torch.autograd.grad(q, theta_T)
    torch.testing.assert_close(got, F_GATE ** steps * dq, rtol=1e-10, atol=1e-13)
    # the test has teeth: the second-order meta-gradient is far from it
    c0 = list(m.net.parameters())
    theta2 = by_hand(m, ep.support_x, ep.support_y, steps, second_order=True)
    q2 = F.cross_entropy(torch.func.functional_call(m.net, m.unflatten(theta2), (ep.query_x,)), ep.query_y)
    second = torch.cat([g.reshape(-1) for g in torch.autograd.grad(q2, c0)])
    assert (second - got).norm() > 1e-3 * got.norm()


def test_meta_loss_reaches_every_lstm_weight_and_the_initial_learner_weights():
    m = make_learner()
    loss, metrics = m.meta_loss(make_episodes(n_tasks=2))
    assert set(metrics) == {"loss", "acc", "forget_gate", "input_gate"}
    assert 0.98 < metrics["forget_gate"] < 0.995 and 0.006 < metrics["input_gate"] < 0.019  # the paper's init
    loss.backward()
    names = [n for n, _ in m.named_parameters()]
    assert {"lstm.weight_ih", "lstm.weight_hh", "cell.weight_f", "cell.bias_i", "net.1.weight"} <= set(names)
    for name, p in m.named_parameters():
        if name.endswith(("conv1.bias", "conv2.bias")):
            # a conv bias before a batch-statistics norm: its loss gradient, its gates' input and so its
            # meta-gradient are 0
            assert p.grad.abs().max().item() < 1e-12, name
        else:
            assert p.grad is not None and p.grad.abs().max().item() > 1e-8, name


def test_test_time_batch_norm_uses_the_running_averages_of_the_episodes_support_steps():
    """eval_bn=running: each query is normalised with the averages (momentum 0.9, reset per episode) of the
    support batches the learner saw, so a query's score does not depend on the other queries; the learner's
    own buffers never change.  eval_bn=batch: the queries' batch statistics (transductive)."""
    m = make_learner(bn_momentum=0.9)
    set_gates(m)
    eps = make_episodes(n_tasks=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    with torch.no_grad():
        logits = m.predict(eps)
    assert logits.shape == (2, 6, 3) and not logits.requires_grad
    for t in range(2):
        ep = eps.task(t)
        norms = [mod for mod in copy.deepcopy(m.net).modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        for mod in norms:
            mod.reset_running_stats()  # zeros and ones
            assert mod.momentum == 0.9

        def with_stats(theta):  # the net at theta, sharing the episode's running averages
            net = net_with(m, theta)
            for mod, own in zip([x for x in net.modules() if isinstance(x, torch.nn.BatchNorm2d)], norms):
                mod.running_mean, mod.running_var = own.running_mean, own.running_var
            return net

        theta = flat_c0(m)
        for _ in range(3):  # each step: one training-mode support forward (its gradient, and the averages)
            net = with_stats(theta).train()
            F.cross_entropy(net(ep.support_x), ep.support_y).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
            theta = F_GATE * theta - I_GATE * grad
        with torch.no_grad():
            expected = with_stats(theta).eval()(ep.query_x)
        torch.testing.assert_close(logits[t], expected, rtol=1e-10, atol=1e-12)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    m.eval_bn = "batch"
    with torch.no_grad():
        assert not torch.allclose(m.predict(eps), logits)
    assert all(p.grad is None for p in m.parameters())


def test_bad_settings_are_one_line_errors():
    with pytest.raises(UserError, match="eval_bn"):
        make_learner(eval_bn="population")
    with pytest.raises(UserError, match="inner_steps"):
        make_learner(inner_steps=0)
    with pytest.raises(UserError, match="data.n_way=3"):
        make_learner().check_n_way(5)


FAST = ["algo=meta_lstm", "debug=smoke", "backbone.hidden=8", "device.threads=1", "algo.inner_steps=3",
        "algo.eval_inner_steps=3", "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]
RESUMABLE = [*FAST, *RESUMABLE_STEPS]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """`fewshot train algo=meta_lstm debug=smoke` (4 steps, checkpoints at 2 and 4), run once for the tests below."""
    return smoke_train(tmp_path_factory.mktemp("meta_lstm"), RESUMABLE)[0]


def test_meta_lstm_smoke_train_then_eval(unbroken, tmp_path):
    rows = records(unbroken)
    gates = [r["train/forget_gate"] for r in rows if "train/forget_gate" in r]
    assert len(gates) == 4 and all(0.9 < g < 1 for g in gates)
    smoke_eval(unbroken, tmp_path, "algo.eval_bn=batch", "algo.eval_inner_steps=2", "eval.n_episodes=6")


@pytest.mark.slow  # two more CLI runs (~10 s on idle cores): the default tier's budget is spent by the others
def test_meta_lstm_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """Killed in step 3 (last.pt at 2), resumed with resume=auto: bitwise the same run as an unbroken one."""
    kill_and_resume(RESUMABLE, unbroken, tmp_path)


@pytest.mark.slow
def test_compiled_meta_learner_step_gives_the_same_loss_and_meta_gradient_in_float64():
    """device.compile=true: torch.compile of ``update`` (layer 1 + the cell over every coordinate); the same
    loss and meta-gradient to rounding (float64), the same state-dict keys."""
    a, b = make_learner(seed=0), make_learner(seed=1)
    b.load_state_dict(a.state_dict())
    b.compile_for_speed()
    assert list(a.state_dict()) == list(b.state_dict())
    episodes = make_episodes(n_tasks=2)
    (la, _), (lb, _) = a.meta_loss(episodes), b.meta_loss(episodes)
    la.backward()
    lb.backward()
    assert abs(float(la - lb)) <= 1e-12 * abs(float(la))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert float((pa.grad - pb.grad).norm()) <= 1e-10 * float(pa.grad.norm()) + 1e-14, name
