"""train.ema_decay: the weight average's arithmetic, which weights validation, the test, best.pt and
`fewshot eval` use, that it leaves training itself untouched, and exact resume."""

from __future__ import annotations

import pytest
import torch

from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.engine.ema import WeightAverage, eval_weights


def test_average_follows_the_warmed_up_decay_and_copies_integer_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    avg = WeightAverage(net, decay=0.9)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for t in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(5, 3))  # training mode: moves the running statistics, counts a batch
        d = min(0.9, (1 + t) / (10 + t))
        assert avg.current_decay() == d
        avg.update(net)
        for k, v in net.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    for k, v in avg.weights.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6)
    assert avg.weights["1.num_batches_tracked"].item() == 30
    assert not torch.equal(avg.weights["0.weight"], net[0].weight)


def test_applied_loads_the_average_and_gives_the_model_its_own_weights_back():
    net = torch.nn.Linear(2, 2)
    avg = WeightAverage(net, decay=0.5)
    own = net.weight.detach().clone()
    avg.weights["weight"].fill_(7.0)
    with avg.applied(net):
        assert torch.all(net.weight == 7.0)
    assert torch.equal(net.weight, own)
    with pytest.raises(RuntimeError), avg.applied(net):
        raise RuntimeError("evaluation failed")
    assert torch.equal(net.weight, own)


def test_state_round_trips_and_a_foreign_state_is_refused():
    net = torch.nn.Linear(2, 2)
    a, b = WeightAverage(net, 0.99), WeightAverage(torch.nn.Linear(2, 2), 0.99)
    a.update(net)
    b.load_state_dict(a.state_dict())
    assert b.updates == 1 and torch.equal(b.weights["weight"], a.weights["weight"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        WeightAverage(torch.nn.Linear(2, 3), 0.99).load_state_dict(a.state_dict())
    with pytest.raises(ValueError):
        WeightAverage(net, 1.0)


SMOKE = ["debug=smoke", "algo=protonet", "backbone.hidden=8", "device.threads=1", "train.steps=4",
         "train.val_every=2", "train.ckpt_every=2", "train.outer_lr=0.05", "logger=none"]


def test_training_is_untouched_and_validation_test_and_eval_use_the_average(compose_cfg, tmp_path, monkeypatch):
    """A run with train.ema_decay trains the very same weights as one without (last.pt's model and
    optimizer are bitwise equal); its validation and its test see the average's weights, which
    best.pt carries and `fewshot eval` uses."""
    import fewshot_runner.engine.eval_checkpoint as eval_checkpoint
    import fewshot_runner.engine.loop as loop
    import fewshot_runner.engine.run as run

    seen = []
    real_eval = run.evaluate

    def spy(algo, split, *a, **k):
        seen.append((split.name, {n: v.detach().clone() for n, v in algo.state_dict().items()}))
        return real_eval(algo, split, *a, **k)

    for module in (loop, run, eval_checkpoint):  # validation, the final test, `fewshot eval`
        monkeypatch.setattr(module, "evaluate", spy)
    plain = run.train(compose_cfg(SMOKE), run_dir=tmp_path / "plain")
    seen.clear()
    res = run.train(compose_cfg([*SMOKE, "train.ema_decay=0.5"]), run_dir=tmp_path / "ema")

    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ema" / "checkpoints" / "last.pt", weights_only=True)
    assert a["ema"] is None and b["ema"]["updates"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for (ga, gb) in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(ga["exp_avg"], gb["exp_avg"])
    avg, own = b["ema"]["weights"], b["model"]
    assert any(not torch.equal(avg[k], own[k]) for k in own), "the average should differ from the model here"

    assert [name for name, _ in seen] == ["val", "val", "test"]
    val_at_4 = seen[1][1]
    assert all(torch.equal(val_at_4[k], avg[k]) for k in avg)  # validated at step 4: the average
    best = ckpt.load_checkpoint(tmp_path / "ema" / "checkpoints" / "best.pt")
    assert all(torch.equal(seen[2][1][k], eval_weights(best)[k]) for k in avg)  # the test: best.pt's average
    assert res["test/acc"] != plain["test/acc"] or res["val/best_acc"] != plain["val/best_acc"]

    seen.clear()
    cfg = compose_cfg([f"checkpoint={tmp_path / 'ema' / 'checkpoints' / 'best.pt'}", "device=cpu",
                       "eval.n_episodes=20", "eval.chunk=10"], name="eval")  # as debug=smoke tests
    again = eval_checkpoint.evaluate_checkpoint(cfg, run_dir=tmp_path / "ev")
    assert all(torch.equal(seen[0][1][k], eval_weights(best)[k]) for k in avg)
    assert again["test/acc"] == res["test/acc"]  # the same episodes (eval.seed) and the same weights


# Exact resume with the average: tests/test_faults.py's ProtoNet runs set train.ema_decay, so every
# kill-and-resume case there compares the average's state bit for bit too.
