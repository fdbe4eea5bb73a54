"""The real `fewshot` CLI in a subprocess: smoke train -> checkpoint -> eval, sweeps."""

import csv
import json
import time
from pathlib import Path

import pytest
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
    from fewshot_runner.cli import conf_dir

    for group in ("algo", "data", "debug"):  # every option of the group, as conf/ holds them
        options = sorted(f.stem for f in (Path(conf_dir()) / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in p.stdout, (group, options)
    assert time.time() - t < 15  # two interpreter starts; torch is not imported


def test_smoke_train_then_eval(cli, tmp_path):
    run = tmp_path / "run"
    p = cli("train", "debug=smoke", "algo=protonet", "eval.pictures=true", f"hydra.run.dir={run}")
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
    assert "step 4/4  loss " in p.stdout and "  lr " in p.stdout and " steps/s" in p.stdout, p.stdout
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


# ----------------------------------------------------------------------------- the allocator re-exec
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
WATCHED = (*ALLOCATOR, "FEWSHOT_NO_REEXEC")
# Loaded by every Python interpreter started with this folder on PYTHONPATH: one JSON line per start (an
# exec'd process starts a new interpreter under the same pid) with the variables it was started with.
START_LOG_HOOK = """\
import json, os, sys
with open(os.environ["FEWSHOT_TEST_START_LOG"], "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv,
                        "env": {k: os.environ.get(k) for k in %r}}) + "\\n")
""" % (WATCHED,)


def console_script_starts(tmp_path, *args):
    """Run the installed ``fewshot`` console script without the allocator variables set; return the
    interpreter starts of its process (the same pid across an exec) and the finished process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import real_data_root

    script = Path(sys.executable).parent / "fewshot"
    assert script.exists(), f"no console script at {script}: install the package (pip install -e '.[dev]')"
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(START_LOG_HOOK)
    log = tmp_path / f"starts{len(list(tmp_path.glob('starts*')))}.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in WATCHED and k != "COMET_API_KEY"}
    env.update(FEWSHOT_TEST_START_LOG=str(log), FEWSHOT_FAULT="",
               FEWSHOT_DATA=str(real_data_root() or tmp_path / "no-data"),
               PYTHONPATH=os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
    p = subprocess.Popen([str(script), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        p.stdout_text, p.stderr_text = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    starts = [json.loads(ln) for ln in log.read_text().splitlines()]
    return [s for s in starts if s["pid"] == p.pid], p


def test_fewshot_train_reexecs_itself_with_the_allocator_settings_unless_turned_off(tmp_path):
    """`fewshot train` started without MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ replaces itself
    (same process) by `python -m fewshot_runner.cli` with them set, once; device.tune_allocator=false runs
    as it was started."""
    run = tmp_path / "run"
    starts, p = console_script_starts(tmp_path, "train", "debug=smoke", "algo=protonet", "backbone.hidden=8",
                                      "train.steps=2", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr_text[-2000:]
    assert (run / "results.json").exists()
    assert [s["env"] for s in starts] == [{k: None for k in WATCHED}, {**ALLOCATOR, "FEWSHOT_NO_REEXEC": "1"}], starts
    assert starts[0]["argv"][0].endswith("fewshot")

    run = tmp_path / "off"
    starts, p = console_script_starts(tmp_path, "train", "debug=smoke", "algo=protonet", "backbone.hidden=8",
                                      "train.steps=2", "device.tune_allocator=false", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr_text[-2000:]
    assert (run / "results.json").exists()
    assert [s["env"] for s in starts] == [{k: None for k in WATCHED}], starts


def test_the_reexec_keeps_the_command_line_and_happens_only_where_it_should(monkeypatch):
    """In-process, os.execve caught: the re-exec runs this interpreter on the same arguments with the
    allocator variables added to the environment; set already, turned off, after a re-exec, or for
    Hydra's config-only flags, it does not happen."""
    import os
    import sys

    from fewshot_runner import cli

    class Execd(Exception):
        pass

    class Preflight(Exception):
        pass

    calls = []

    def execve(path, argv, env):
        calls.append((path, argv, env))
        raise Execd

    def preflight(command, args):
        raise Preflight

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(cli, "preflight", preflight)
    for k in WATCHED:
        monkeypatch.delenv(k, raising=False)

    def main(*args, **env):
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", ["fewshot", *args])
            for k, v in env.items():
                m.setenv(k, v)
            calls.clear()
            with pytest.raises((Execd, Preflight, SystemExit)) as e:
                cli.main(list(args))
            return calls[:], e.type

    (path, argv, env), = main("train", "debug=smoke", "seed=3")[0]
    assert path == sys.executable and argv == [sys.executable, "-m", "fewshot_runner.cli", "train", "debug=smoke",
                                               "seed=3"]
    assert {k: env.get(k) for k in WATCHED} == {**ALLOCATOR, "FEWSHOT_NO_REEXEC": "1"}
    assert env.get("PATH") == os.environ.get("PATH")  # the rest of the environment is kept
    assert main("train", "-m", "seed=1,2")[0]  # sweeps too
    assert main("eval", "checkpoint=x.pt")[0]
    (_, _, env), = main("train", MALLOC_MMAP_THRESHOLD_="5")[0]
    assert env["MALLOC_MMAP_THRESHOLD_"] == "5"  # a value the user set is kept
    for args, env in [(("train", "device.tune_allocator=false"), {}), (("train", "device.tune_allocator=0"), {}),
                      (("train",), ALLOCATOR), (("train",), {"FEWSHOT_NO_REEXEC": "1"}),
                      (("train", "--cfg", "job"), {})]:
        assert main(*args, **env)[0] == [], (args, env)
