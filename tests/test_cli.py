"""The real `fewshot` CLI in a subprocess: smoke train -> checkpoint -> eval, sweeps."""

import csv
import json
import time

import torch


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_help_is_fast_and_lists_commands(cli):
    t = time.time()
    p = cli("--help")
    assert p.returncode == 0 and "train" in p.stdout and "eval" in p.stdout
    p = cli("train", "--help")
    assert p.returncode == 0
    for group in ("algo: fomaml, maml, protonet", "data: omniglot, synthetic", "debug: smoke"):
        assert group in p.stdout
    assert time.time() - t < 15  # two interpreter starts; torch is not imported


def test_smoke_train_then_eval(cli, tmp_path):
    run = tmp_path / "run"
    p = cli("train", "debug=smoke", "algo=protonet", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr
    for f in ("metrics.jsonl", "results.json", "config.yaml", "checkpoints/best.pt", "checkpoints/last.pt", "curves.png"):
        assert (run / f).exists(), f
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["test/acc"] <= 1 and res["test/n_episodes"] == 20 and res["steps"] == 4
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 4
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for key in ("config", "model", "optimizer", "step", "rng", "sampler", "package_version"):
        assert key in ck
    assert "test acc" in p.stdout
    # no progress bar is drawn into a pipe: plain lines say how the run goes (the last step, each validation)
    assert "step 4/4  loss " in p.stdout and " it/s  lr " in p.stdout, p.stdout
    assert "step 2/4  val acc " in p.stdout and "step 4/4  val acc " in p.stdout, p.stdout

    ev = tmp_path / "ev"
    p = cli("eval", f"checkpoint={run / 'checkpoints' / 'best.pt'}", "data.n_way=10", "eval.n_episodes=30",
            "device=cpu", f"hydra.run.dir={ev}")
    assert p.returncode == 0, p.stderr
    r = json.loads((ev / "results.json").read_text())
    assert r["n_way"] == 10 and r["test/n_episodes"] == 30


def test_maml_smoke_and_eval_refuses_other_way(cli, tmp_path):
    run = tmp_path / "run"
    p = cli("train", "debug=smoke", "algo=maml", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr
    best = run / "checkpoints" / "best.pt"
    before = best.read_bytes()
    p = cli("eval", f"checkpoint={best}", "data.n_way=10", "device=cpu", f"hydra.run.dir={tmp_path / 'ev'}")
    assert_one_line_error(p, "5-way head", "data.n_way=5")
    assert best.read_bytes() == before


def test_multirun_writes_summary(cli, tmp_path):
    sweep = tmp_path / "sweep"
    p = cli("train", "-m", "debug=smoke", "algo=protonet,fomaml", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"}
    assert "algo=protonet" in rows[0]["overrides"] and "algo=fomaml" in rows[1]["overrides"]
    assert all(0 <= float(r["test/acc"]) <= 1 for r in rows)
    md = (sweep / "summary.md").read_text()
    assert "| fomaml |" in md and "±" in md  # (one column per swept key)
    assert "sweep summary" in p.stdout


# Bad input (override keys and types, shapes, data, checkpoints, folders, device): tests/test_bad_input.py
