"""train(cfg) in-process: every algorithm with debug=smoke, and a short real Omniglot training."""

import json

import pytest

from fewshot_runner.engine.run import train


@pytest.mark.parametrize("algo", ["maml", "fomaml", "protonet"])
@pytest.mark.parametrize("backbone", ["conv4", "conv4_strided", "mlp"])
def test_smoke_every_algo_and_backbone(compose_cfg, tmp_path, algo, backbone):
    cfg = compose_cfg(["debug=smoke", f"algo={algo}", f"backbone={backbone}"])
    res = train(cfg, run_dir=tmp_path)
    assert res["steps"] == 4 and 0.0 <= res["test/acc"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["test/acc"] == res["test/acc"]


def test_smoke_on_real_omniglot(compose_cfg, tmp_path, omniglot_root, monkeypatch):
    monkeypatch.setenv("FEWSHOT_DATA", str(omniglot_root))
    cfg = compose_cfg(["debug=smoke", "data=omniglot", "algo=maml"])
    assert train(cfg, run_dir=tmp_path)["steps"] == 4


def test_protonet_on_real_omniglot_beats_chance_widely(compose_cfg, tmp_path, omniglot_root, monkeypatch):
    """60 steps of 20-way ProtoNet training: 5-way 1-shot test accuracy far above 20 % chance."""
    monkeypatch.setenv("FEWSHOT_DATA", str(omniglot_root))
    cfg = compose_cfg(["data=omniglot", "algo=protonet", "device=cpu", "logger=none", "train.steps=60",
                       "data.train_n_way=20", "data.train_n_query=5", "train.val_every=30",
                       "train.val_episodes=50", "train.log_every=10", "train.progress=false",
                       "eval.n_episodes=100"])
    res = train(cfg, run_dir=tmp_path)
    assert res["test/n_episodes"] == 100
    assert res["test/acc"] > 0.7, res


def test_eval_runs_a_checkpoint_with_the_device_settings_given_to_eval(compose_cfg, tmp_path, monkeypatch):
    """The checkpoint's config holds resolved device-derived keys (backbone.fused_ops, algo.batch_tasks);
    `fewshot eval ... device.fused_ops=off device.batch_tasks=on` must build the model with those."""
    import fewshot_runner.engine.run as run

    train(compose_cfg(["debug=smoke", "algo=maml", "device.fused_ops=on"]), run_dir=tmp_path / "run")
    built = []
    real = run.build_learner
    monkeypatch.setattr(run, "build_learner", lambda cfg, *a: built.append(cfg) or real(cfg, *a))
    cfg = compose_cfg([f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "device=cpu",
                       "device.fused_ops=off", "device.batch_tasks=on", "eval.n_episodes=4"], name="eval")
    res = run.evaluate_checkpoint(cfg, run_dir=tmp_path / "ev")
    assert built[0].backbone.fused_ops == "off" and built[0].algo.batch_tasks == "on"
    assert built[0].backbone._target_.endswith("Conv4") and 0 <= res["test/acc"] <= 1
