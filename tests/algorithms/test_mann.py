"""MANN: its memory equations against hand computations (float64), the label offset, the per-instance
bookkeeping, the loss gradient against finite differences, its sequence source, test-time scoring, and the
CLI (smoke train, eval, the per-instance script, kill + resume bitwise)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from test_faults import records

from conftest import REPO, RESUMABLE_STEPS, kill_and_resume, smoke_eval, smoke_train
from fewshot_runner.algorithms.mann import MANN, SequenceBatch, SequenceSource, support_order
from fewshot_runner.algorithms.memory import (COSINE_EPS, instance_accuracy, instance_numbers, least_used, read,
                                              read_weights, sequence_inputs, usage_update, write, write_weights)
from fewshot_runner.backbones.mlp import MLP
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

D = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=D)


# ---------------------------------------------------------------------------------------- memory equations
def test_read_weights_and_read_vector_equal_a_hand_computation():
    memory = t([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # (1, N=3, W=2)
    keys = t([[[1.0, 1.0], [2.0, -1.0]]])  # (1, H=2, W=2)
    expected_w, expected_r = [], []
    for k in keys[0].tolist():
        cos = []
        for m in memory[0].tolist():
            dot = k[0] * m[0] + k[1] * m[1]
            norms = math.sqrt(k[0] ** 2 + k[1] ** 2 + COSINE_EPS) * math.sqrt(m[0] ** 2 + m[1] ** 2 + COSINE_EPS)
            cos.append(dot / norms)
        e = [math.exp(c) for c in cos]
        w = [x / sum(e) for x in e]
        expected_w.append(w)
        expected_r.append([sum(w[i] * memory[0, i, j].item() for i in range(3)) for j in range(2)])
    w = read_weights(keys, memory)
    torch.testing.assert_close(w, t([expected_w]), rtol=0, atol=1e-15)
    torch.testing.assert_close(read(w, memory), t([expected_r]), rtol=0, atol=1e-15)
    # one entry in closed form: the second key against slots 0 and 1 (cosines 2/sqrt(5) and -1/sqrt(5))
    assert w[0, 1, 0] / w[0, 1, 1] == pytest.approx(math.exp(3 / math.sqrt(5)), rel=1e-7)


def test_usage_update_equals_gamma_usage_plus_read_and_write_weights_summed_over_heads():
    usage = t([[0.5, 0.1, 0.0]])
    w_read = t([[[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]])
    w_write = t([[[0.0, 0.7, 0.3], [0.1, 0.1, 0.8]]])
    expected = [0.9 * 0.5 + 0.8 + 0.1, 0.9 * 0.1 + 0.6 + 0.8, 0.9 * 0.0 + 0.6 + 1.1]
    torch.testing.assert_close(usage_update(usage, w_read, w_write, 0.9), t([expected]), rtol=0, atol=1e-15)


def test_least_used_marks_exactly_the_n_smallest_usages_ties_to_the_lower_index():
    usage = t([[0.3, 0.1, 0.1, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert least_used(usage, 2).tolist() == [[0, 1, 0, 0, 1], [1, 1, 0, 0, 0]]
    assert least_used(usage, 3).tolist() == [[0, 1, 1, 0, 1], [1, 1, 1, 0, 0]]
    assert least_used(usage, 1).tolist() == [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]]


def test_write_weights_interpolate_previous_reads_and_least_used_by_sigmoid_alpha():
    alpha = t([[[0.0], [2.0]]])  # (1, H=2, 1)
    w_read_prev = t([[[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])
    w_lu_prev = t([[0.0, 1.0, 1.0]])
    s = 1 / (1 + math.exp(-2.0))
    expected = [[0.5, 0.5, 0.5], [s * 0.2, s * 0.3 + (1 - s), s * 0.5 + (1 - s)]]
    torch.testing.assert_close(write_weights(alpha, w_read_prev, w_lu_prev), t([expected]), rtol=0, atol=1e-15)


def test_write_zeroes_the_least_used_slot_then_adds_each_heads_key_by_its_weights():
    memory = t([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    usage_prev = t([[0.4, 0.2, 0.9]])  # slot 1 is zeroed
    w_write = t([[[0.5, 0.25, 0.0], [0.0, 1.0, 0.5]]])
    keys = t([[[2.0, -2.0], [1.0, 3.0]]])
    expected = [[1 + 0.5 * 2, 2 + 0.5 * -2], [0 + 0.25 * 2 + 1 * 1, 0 + 0.25 * -2 + 1 * 3], [5 + 0.5 * 1, 6 + 0.5 * 3]]
    torch.testing.assert_close(write(memory, w_write, keys, usage_prev), t([expected]), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------- sequences
def test_the_label_of_item_t_is_input_at_step_t_plus_one_never_at_t():
    features = torch.arange(8, dtype=D).view(1, 4, 2)
    labels = torch.tensor([[2, 0, 1, 2]])
    inp = sequence_inputs(features, labels, 3)
    assert inp.shape == (1, 4, 5)
    assert torch.equal(inp[..., :2], features)
    assert inp[0, :, 2:].tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]]


def tiny_mann(seed=0, n_way=3):
    torch.manual_seed(seed)
    return MANN(MLP((1, 2, 2), hidden=[], batch_norm=False), n_way=n_way, feature_dim=4, controller_size=5,
                memory_slots=6, memory_width=3, read_heads=2, gamma=0.9).double()


def test_the_model_sees_a_label_only_at_the_next_step():
    """Changing y[t] leaves the logits of steps 0..t as they were and changes those of step t + 1."""
    m = tiny_mann()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 1, 2, 2, generator=g, dtype=D)
    y = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    with torch.no_grad():
        base = m.sequence_logits(x, y)
        for step in range(5):
            y2 = y.clone()
            y2[:, step] = (y2[:, step] + 1) % 3
            out = m.sequence_logits(x, y2)
            assert torch.equal(out[:, :step + 1], base[:, :step + 1]), step
            assert not torch.allclose(out[:, step + 1], base[:, step + 1]), step


def test_instance_numbers_and_per_instance_accuracy_on_a_hand_made_sequence():
    y = torch.tensor([[1, 0, 1, 1, 0, 2]])
    assert instance_numbers(y, 3).tolist() == [[1, 1, 2, 3, 2, 1]]
    predicted = torch.tensor([[1, 2, 1, 0, 0, 2]])  # right at positions 0, 2, 4, 5
    logits = torch.nn.functional.one_hot(predicted, 3).to(D)
    acc = instance_accuracy(logits, y, 3, instances=(1, 2, 3, 4))
    assert sorted(acc) == [1, 2, 3]  # no 4th instance: left out
    assert acc[1].tolist() == [pytest.approx(2 / 3)] and acc[2].tolist() == [1.0] and acc[3].tolist() == [0.0]


def test_mann_loss_gradient_matches_central_finite_differences_in_float64():
    m = tiny_mann(seed=3)
    g = torch.Generator().manual_seed(4)
    batch = SequenceBatch(torch.randn(2, 6, 1, 2, 2, generator=g, dtype=D), torch.tensor([[0, 1, 2, 0, 1, 2],
                                                                                          [2, 0, 0, 1, 2, 1]]), 3)
    loss, metrics = m.meta_loss(batch)
    assert {"loss", "acc", "acc_inst1", "acc_inst2"} <= set(metrics) and "acc_inst3" not in metrics
    params = dict(m.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, tuple(params.values()))))
    h, checked = 1e-6, 0
    with torch.no_grad():
        for name, p in params.items():
            flat = p.view(-1)
            for i in range(0, flat.numel(), max(1, flat.numel() // 6)):  # about 6 entries of every parameter
                was = flat[i].item()
                flat[i] = was + h
                up = m.meta_loss(batch)[0].item()
                flat[i] = was - h
                down = m.meta_loss(batch)[0].item()
                flat[i] = was
                fd = (up - down) / (2 * h)
                assert grads[name].view(-1)[i].item() == pytest.approx(fd, rel=1e-6, abs=1e-9), (name, i)
                checked += 1
    assert checked >= 40 and all(g.abs().sum() > 0 for g in grads.values())


def synthetic_split(per_class=12):
    from fewshot_runner.data.synthetic import Synthetic

    data = Synthetic(n_classes_train=6, n_classes_val=3, n_classes_test=3, per_class=per_class, image_size=4)
    return data.split("train")


def test_sequence_source_shuffles_each_sampler_episode_and_resumes_from_its_state():
    from fewshot_runner.data.sampler import EpisodeSampler

    split = synthetic_split()
    src = SequenceSource(split, 3, 1, 3, seed=5)
    batch = src.sample(4)
    assert batch.x.shape == (4, 12, 1, 4, 4) and batch.y.shape == (4, 12) and batch.n_way == 3
    assert all(sorted(row.tolist()) == sorted([0, 1, 2] * 4) for row in batch.y)
    ep = EpisodeSampler(split, 3, 1, 3, seed=5).sample(4)  # the same episodes, the items in another order
    pool = torch.cat([ep.support_x, ep.query_x], 1).flatten(2)
    labels = torch.cat([ep.support_y, ep.query_y], 1)
    for ti in range(4):
        got = sorted(zip(batch.x[ti].flatten(1).tolist(), batch.y[ti].tolist()))
        assert got == sorted(zip(pool[ti].tolist(), labels[ti].tolist()))
    assert not torch.equal(batch.y, labels)  # shuffled, not support-then-query
    state = src.state_dict()
    after = src.sample(2)
    src2 = SequenceSource(split, 3, 1, 3, seed=99)
    src2.load_state_dict(state)
    again = src2.sample(2)
    assert torch.equal(after.x, again.x) and torch.equal(after.y, again.y)
    moved = after.to("cpu", D)
    assert moved.x.dtype == D and moved.x.max() <= 1.0 and moved.y.dtype == torch.long
    assert torch.equal(moved.map_inputs(lambda im: im * 2).x, moved.x * 2)


def test_predict_scores_each_query_one_step_after_the_support_sequence():
    m = tiny_mann(seed=2)
    g = torch.Generator().manual_seed(6)
    eps = Episode(torch.randn(2, 6, 1, 2, 2, generator=g, dtype=D), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
                  torch.randn(2, 4, 1, 2, 2, generator=g, dtype=D), torch.tensor([[0, 1, 2, 2]] * 2), 3)
    with torch.no_grad():
        logits = m.predict(eps)
        assert logits.shape == (2, 4, 3)
        order = support_order(6)
        for ti in range(2):  # by hand: the support sequence, then one step per query with the last support label
            xs, ys = eps.support_x[ti, order].unsqueeze(0), eps.support_y[ti, order].unsqueeze(0)
            _, state = m.run(sequence_inputs(m.encode(xs), ys, 3))
            for q in range(4):
                inp = torch.cat([eps.query_x[ti, q].flatten(), torch.nn.functional.one_hot(ys[0, -1], 3).to(D)])
                _, expected = m.step(state, inp.unsqueeze(0))
                torch.testing.assert_close(logits[ti, q], expected[0], rtol=1e-12, atol=1e-14)
        relabelled = Episode(eps.support_x, eps.support_y, eps.query_x.flip(1), (eps.query_y + 1) % 3, 3)
        torch.testing.assert_close(m.predict(relabelled), logits.flip(1), rtol=1e-12, atol=1e-14)  # no query label used
    with pytest.raises(UserError, match="data.n_way=3"):
        m.check_n_way(5)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(UserError, match="algo.read_heads=9"):
        MANN(MLP((1, 2, 2), hidden=[]), n_way=3, feature_dim=4, memory_slots=8, read_heads=9)
    with pytest.raises(UserError, match="algo.gamma=1.5"):
        MANN(MLP((1, 2, 2), hidden=[]), n_way=3, feature_dim=4, gamma=1.5)


# ---------------------------------------------------------------------------------------- the CLI
FAST = ["algo=mann", "debug=smoke", "device.threads=1", "algo.controller_size=16", "algo.memory_slots=16",
        "algo.memory_width=8", "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]

RESUMABLE = [*FAST, *RESUMABLE_STEPS]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """`fewshot train algo=mann debug=smoke` (4 steps, checkpoints at 2 and 4), run once for the tests below."""
    return smoke_train(tmp_path_factory.mktemp("mann"), RESUMABLE)[0]


def test_mann_smoke_train_logs_per_instance_accuracy_then_eval(unbroken, tmp_path):
    rows = records(unbroken)
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 4  # smoke: 5-way, 1 shot + 5 queries per class: instances 1..5 of each class
    assert all({f"train/acc_inst{k}" for k in (1, 2, 3, 4, 5)} <= set(r) and "train/acc_inst10" not in r for r in train)
    smoke_eval(unbroken, tmp_path, "eval.n_episodes=6")


def test_mann_instances_script_prints_the_table(unbroken, tmp_path):
    out = tmp_path / "t.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "mann_instances.py"),
                        str(unbroken / "checkpoints" / "last.pt"), "--n-sequences", "8", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    table = json.loads(out.read_text())
    assert table["per_class"] == 6 and sorted(table["instances"], key=int) == ["1", "2", "3", "4", "5"]
    assert "36.4 %" in p.stdout and all(0 <= r["acc"] <= 1 for r in table["instances"].values())


def test_mann_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """Its sequence source (the sampler's generator and its own order generator): killed in step 3 (last.pt
    at 2), resumed with resume=auto, the run ends bitwise equal to an unbroken one."""
    kill_and_resume(RESUMABLE, unbroken, tmp_path)


@pytest.mark.slow
def test_compiled_mann_gives_the_same_loss_gradients_and_state_dict_keys_in_float64():
    """device.compile=true: torch.compile of one time step (about 25 s to compile on a CPU); the fused
    step computes the same function (float64, to rounding) and the checkpoint keys stay."""
    from fewshot_runner.algorithms.mann import sequence_inputs

    a, b = tiny_mann(seed=3), tiny_mann(seed=4)
    b.load_state_dict(a.state_dict())
    b.compile_for_speed()
    assert list(a.state_dict()) == list(b.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 12, 1, 2, 2, generator=g, dtype=D)
    y = torch.randint(0, 3, (3, 12), generator=g)
    losses = []
    for m in (a, b):
        logits = m.run(sequence_inputs(m.encode(x), y, m.n_way))[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        losses.append(loss.detach())
    assert abs(float(losses[0] - losses[1])) <= 1e-12 * abs(float(losses[0]))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.grad is not None and float((pa.grad - pb.grad).norm()) <= 1e-10 * float(pa.grad.norm()) + 1e-14, name
