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
    import fewshot_runner.engine.eval_checkpoint as run

    train(compose_cfg(["debug=smoke", "algo=maml", "device.fused_ops=on"]), run_dir=tmp_path / "run")
    built = []
    real = run.build_learner
    monkeypatch.setattr(run, "build_learner", lambda cfg, *a: built.append(cfg) or real(cfg, *a))
    cfg = compose_cfg([f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "device=cpu",
                       "device.fused_ops=off", "device.batch_tasks=on", "eval.n_episodes=4"], name="eval")
    res = run.evaluate_checkpoint(cfg, run_dir=tmp_path / "ev")
    assert built[0].backbone.fused_ops == "off" and built[0].algo.batch_tasks == "on"
    assert built[0].backbone._target_.endswith("Conv4") and 0 <= res["test/acc"] <= 1


def test_eval_tests_a_checkpoint_on_another_data_set_and_protocol(compose_cfg, tmp_path, omniglot_root, monkeypatch):
    """Cross-domain: `fewshot eval data=NAME` (data.name) tests a model on another data set with the checkpoint's
    episode shape unless given; Omniglot's split_scheme / within_alphabet set the test protocol; a key the data
    set does not have and an unknown data set are one line each."""
    import fewshot_runner.engine.eval_checkpoint as run
    from fewshot_runner.errors import UserError

    monkeypatch.setenv("FEWSHOT_DATA", str(omniglot_root))
    train(compose_cfg(["debug=smoke", "algo=protonet"]), run_dir=tmp_path / "run")  # synthetic 28x28x1
    ckpt = f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}"
    cfg = compose_cfg([ckpt, "device=cpu", "data.name=omniglot", "data.split_scheme=lake", "data.within_alphabet=true",
                       "data.n_way=20", "eval.n_episodes=4"], name="eval")
    res = run.evaluate_checkpoint(cfg, run_dir=tmp_path / "ev")
    assert res["test/data"] == "Omniglot" and res["n_way"] == 20 and res["n_shot"] == 1 and res["n_query"] == 5
    assert res["data/split_checksum"] is not None and 0 <= res["test/acc"] <= 1
    for overrides, message in [(["data.within_alphabet=true"], "data.within_alphabet is not a key of this data set"),
                               (["data.name=nope"], "data=nope is not a data set; use one of")]:
        with pytest.raises(UserError, match=message):
            run.evaluate_checkpoint(compose_cfg([ckpt, "device=cpu", *overrides], name="eval"), run_dir=tmp_path / "x")


def test_cosine_schedule_anneals_to_lr_min_and_resumes(compose_cfg, tmp_path):
    """train.lr_schedule=cosine: the logged outer lr falls from outer_lr to outer_lr * lr_min over
    train.steps, and a run killed at step 5 and resumed logs the same rates as one never stopped."""
    import signal

    from conftest import run_cli

    over = ["debug=smoke", "algo=protonet", "backbone.hidden=8", "device.threads=1", "train.steps=8",
            "train.log_every=1", "train.ckpt_every=2", "train.lr_schedule=cosine", "train.lr_min=0.1",
            "train.outer_lr=0.01", "logger=none"]

    def lrs(run):
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}

    train(compose_cfg(over), run_dir=tmp_path / "a")
    lr = lrs(tmp_path / "a")
    assert sorted(lr) == list(range(1, 9))
    assert all(lr[s + 1] < lr[s] for s in range(1, 8))
    cos = __import__("math").cos
    assert lr[8] == pytest.approx(0.001, rel=1e-9)
    assert lr[2] == pytest.approx(0.001 + 0.009 * (1 + cos(__import__("math").pi * 2 / 8)) / 2, rel=1e-9)
    run = tmp_path / "b"
    p = run_cli(["train", *over, f"hydra.run.dir={run}"], tmp_path, env_extra={"FEWSHOT_FAULT": "kill@step:5"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    p = run_cli(["train", *over, f"hydra.run.dir={run}", "resume=auto"], tmp_path)
    assert p.returncode == 0 and "at step 4" in p.stdout, p.stderr[-2000:]
    assert lrs(run) == lr


def test_trainval_split_trains_on_val_classes_and_keeps_the_last_model(compose_cfg, tmp_path, monkeypatch):
    """train.split=trainval: the sampler draws from train + val classes, no validation runs, and
    best.pt is the last model (what the test evaluates)."""
    import fewshot_runner.data.base as data_base  # (ClassSplit.episode_sampler builds the samplers)
    import fewshot_runner.engine.loop as loop
    import fewshot_runner.engine.run as run
    from fewshot_runner.engine import checkpoint as ckpt

    seen, evaluated = [], []
    real_sampler, real_eval = data_base.EpisodeSampler, run.evaluate
    monkeypatch.setattr(data_base, "EpisodeSampler", lambda split, *a, **k: seen.append(split.name) or real_sampler(split, *a, **k))
    for module in (loop, run):
        monkeypatch.setattr(module, "evaluate", lambda algo, split, *a, **k: evaluated.append(split.name) or real_eval(algo, split, *a, **k))
    cfg = compose_cfg(["debug=smoke", "algo=protonet", "train.split=trainval", "train.val_every=2"])
    res = train(cfg, run_dir=tmp_path)
    assert seen[0] == "trainval" and "val" not in seen and evaluated == ["test"]  # (then the test's episodes)
    assert res["val/best_acc"] is None and res["best_step"] == res["steps"] == 4
    assert ckpt.load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 4


def test_eval_overrides_test_time_adaptation(compose_cfg, tmp_path, monkeypatch):
    """`fewshot eval ... algo.eval_inner_steps=N algo.inner_lr=X` adapts MAML with those at test time;
    a learner without them (ProtoNet) refuses them with one line, and so does MAML for a key it does not
    declare in its eval_settings."""
    import fewshot_runner.engine.eval_checkpoint as run
    from fewshot_runner.errors import UserError

    train(compose_cfg(["debug=smoke", "algo=maml"]), run_dir=tmp_path / "maml")
    steps = []
    real = run.build_learner
    monkeypatch.setattr(run, "build_learner", lambda cfg, *a: steps.append(cfg.algo) or real(cfg, *a))
    ck = tmp_path / "maml" / "checkpoints" / "best.pt"
    res = run.evaluate_checkpoint(compose_cfg([f"checkpoint={ck}", "++algo.eval_inner_steps=7", "++algo.inner_lr=0.05",
                                               "eval.n_episodes=4"], name="eval"), run_dir=tmp_path / "ev")
    assert steps[0].eval_inner_steps == 7 and steps[0].inner_lr == 0.05
    assert res["algo/eval_inner_steps"] == 7 and res["algo/inner_lr"] == 0.05
    train(compose_cfg(["debug=smoke", "algo=protonet"]), run_dir=tmp_path / "proto")
    with pytest.raises(UserError, match="none of its settings of the checkpoint's learner .PrototypicalNetworks"):
        run.evaluate_checkpoint(compose_cfg([f"checkpoint={tmp_path / 'proto' / 'checkpoints' / 'best.pt'}",
                                             "++algo.eval_inner_steps=3"], name="eval"), run_dir=tmp_path / "ev2")
    with pytest.raises(UserError, match=r"may change only algo.eval_inner_steps, algo.inner_lr .*MAML"):
        run.evaluate_checkpoint(compose_cfg([f"checkpoint={ck}", "++algo.inner_steps=3"], name="eval"),
                                run_dir=tmp_path / "ev3")


def test_status_lines_are_spaced_in_time_and_the_last_step_always_has_one(compose_cfg, tmp_path, monkeypatch, capsys):
    """No bar is drawn (train.progress=false): a status line at a log step once STATUS_EVERY_S has passed
    since the last one, and always at the last step."""
    import fewshot_runner.engine.loop as run

    monkeypatch.setattr(run, "STATUS_EVERY_S", 0.0)
    train(compose_cfg(["debug=smoke", "algo=protonet", "train.steps=3"]), run_dir=tmp_path / "every")
    out = capsys.readouterr().out
    assert [f"step {i}/3  loss" in out for i in (1, 2, 3)] == [True, True, True], out

    monkeypatch.setattr(run, "STATUS_EVERY_S", 1e9)
    train(compose_cfg(["debug=smoke", "algo=protonet", "train.steps=3"]), run_dir=tmp_path / "last")
    out = capsys.readouterr().out
    assert [f"step {i}/3  loss" in out for i in (1, 2, 3)] == [False, False, True], out
    assert "step 2/3  val acc " in out and "step 3/3  val acc " in out


def test_a_checkpoint_written_before_the_optimizer_group_and_transform_keys_evaluates_and_resumes(compose_cfg, tmp_path):
    """Checkpoints from before the learner interface (no optimizer group, no data.normalize/augment/workers,
    no print_config, no logger.log_model in their config) still evaluate to the same accuracy and resume."""
    import torch

    from fewshot_runner.engine.eval_checkpoint import evaluate_checkpoint

    res = train(compose_cfg(["debug=smoke", "algo=maml", "train.steps=2"]), run_dir=tmp_path / "run")
    for name in ("best.pt", "last.pt"):
        path = tmp_path / "run" / "checkpoints" / name
        state = torch.load(path, weights_only=False)
        cfg = state["config"]
        for key in ("optimizer", "print_config"):
            cfg.pop(key)
        for key in ("normalize", "augment", "workers"):
            cfg["data"].pop(key)
        cfg["logger"].pop("log_model", None)
        torch.save(state, path)
    ev = evaluate_checkpoint(compose_cfg([f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "device=cpu",
                                          "eval.n_episodes=20", "eval.chunk=10"], name="eval"), run_dir=tmp_path / "ev")
    assert ev["test/acc"] == res["test/acc"]
    more = train(compose_cfg(["debug=smoke", "algo=maml", "train.steps=3",
                              f"resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}"]), run_dir=tmp_path / "more")
    assert more["steps"] == 3


def test_resume_auto_with_more_steps_trains_a_finished_run_on(compose_cfg, tmp_path, capsys):
    """``resume=auto`` with a larger ``train.steps`` trains a finished run on from its last.pt and ends
    bitwise equal to a run that trained that long from the start (one test record in metrics.jsonl); the
    same ``train.steps`` skips it; a learner that anneals over ``train.steps`` refuses the change in one line."""
    import torch

    from fewshot_runner.engine.checkpoint import load_checkpoint
    from fewshot_runner.errors import CheckpointError

    over = ["debug=smoke", "algo=protonet", "backbone.hidden=8", "device.threads=1", "train.log_every=1",
            "train.ckpt_every=2", "train.val_every=2", "logger=none"]
    whole = train(compose_cfg(over + ["train.steps=6"]), run_dir=tmp_path / "a")
    first = train(compose_cfg(over + ["train.steps=4"]), run_dir=tmp_path / "b")
    assert first["steps"] == 4
    on = train(compose_cfg(over + ["train.steps=6", "resume=auto"]), run_dir=tmp_path / "b")
    assert "resuming from" in capsys.readouterr().out
    assert on["steps"] == 6 and on["test/acc"] == whole["test/acc"]
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["model"] for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == list(range(1, 7))
    assert [r["step"] for r in rows if "test/acc" in r] == [6]
    again = train(compose_cfg(over + ["train.steps=6", "resume=auto"]), run_dir=tmp_path / "b")
    assert "done already" in capsys.readouterr().out and again == on

    rep = ["debug=smoke", "algo=reptile", "backbone.hidden=8", "device.threads=1", "logger=none"]
    train(compose_cfg(rep + ["train.steps=2"]), run_dir=tmp_path / "r")
    with pytest.raises(CheckpointError, match="anneals its schedules; resume with train.steps=2"):
        train(compose_cfg(rep + ["train.steps=3", "resume=auto"]), run_dir=tmp_path / "r")
