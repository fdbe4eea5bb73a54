"""MANN's per-instance accuracy as a test measure: the learner's ``test_measures`` hook, written to results.json,
the logger and the results table by training's final test and by ``fewshot eval``."""

import contextlib
import json

import pytest
import torch

from fewshot_runner.algorithms.mann import MANN, SequenceSource
from fewshot_runner.backbones.mlp import MLP
from fewshot_runner.data.synthetic import Synthetic
from fewshot_runner.engine.eval_checkpoint import evaluate_checkpoint
from fewshot_runner.engine.run import train

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


class CPU:
    """The two things test_measures takes from a runtime."""

    device = torch.device("cpu")
    autocast = staticmethod(contextlib.nullcontext)


def test_test_measures_are_the_accuracy_at_each_presentation_of_a_class_counted_by_hand():
    torch.manual_seed(0)
    mann = MANN(MLP((1, 4, 4), hidden=[], batch_norm=False), n_way=3, feature_dim=16, controller_size=5,
                memory_slots=6, memory_width=3, read_heads=2, gamma=0.9).eval()
    with torch.no_grad():  # large random weights: predictions that differ from item to item
        for p in mann.parameters():
            p.normal_(0.0, 1.0)
    split = Synthetic(n_classes_train=6, n_classes_val=3, n_classes_test=3, per_class=8, image_size=4).split("test")
    with torch.no_grad():
        got = mann.test_measures(split, n_way=3, per_class=4, n_tasks=7, seed=5, runtime=CPU)
        batch = SequenceSource(split, 3, 1, 3, 5).sample(7).to(CPU.device)  # the same seeded sequences (to: floats)
        pred = mann.sequence_logits(batch.x, batch.y).argmax(-1)
    assert sorted(got) == ["acc_inst1", "acc_inst2", "acc_inst3", "acc_inst4"]  # 5 and 10: never reached
    wanted = set()
    for k in (1, 2, 3, 4):
        want = []
        for b in range(7):  # the k-th time each label appears in sequence b
            seen, right, total = {}, 0, 0
            for t in range(batch.y.shape[1]):
                c = int(batch.y[b, t])
                seen[c] = seen.get(c, 0) + 1
                if seen[c] == k:
                    total += 1
                    right += int(pred[b, t] == c)
            want.append(right / total)
        assert got[f"acc_inst{k}"].shape == (7,)
        assert got[f"acc_inst{k}"].tolist() == pytest.approx(want, abs=1e-12)
        wanted |= set(want)
    assert len(wanted) >= 3, wanted  # (not a constant prediction, which any count would match)


SMOKE = ["algo=mann", "debug=smoke", "algo.controller_size=16", "algo.memory_slots=16", "algo.memory_width=8",
         "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]


def test_training_and_eval_write_the_per_instance_accuracy_to_results(compose_cfg, tmp_path):
    """debug=smoke: 5-way, 1 shot + 5 queries: instances 1..5 of each class over eval.n_episodes sequences."""
    results = train(compose_cfg(SMOKE), tmp_path / "run")
    keys = [f"test/acc_inst{k}" for k in (1, 2, 3, 4, 5)]
    for k in keys:
        assert 0.0 <= results[k] <= 1.0 and results[f"{k}_ci95"] >= 0.0
    assert "test/acc_inst10" not in results
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {k: written[k] for k in keys} == {k: results[k] for k in keys}
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(set(keys) <= set(r) for r in logged)
    # fewshot eval on the checkpoint: the same sequences (eval.seed + 1), so the same figures
    cfg = compose_cfg([f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "eval.n_episodes=6",
                       "eval.pictures=false", "logger=none"], name="eval")
    again = evaluate_checkpoint(cfg, tmp_path / "eval")
    assert {k: again[k] for k in keys} == {k: results[k] for k in keys}
