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
