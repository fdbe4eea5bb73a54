"""Runs that survive: kill -9 and resume bitwise, graceful stop, atomic writes, a full disk,
NaN losses, resumable sweeps and Comet without a server, through the real CLI.

Faults are injected at exact points with the ``FEWSHOT_FAULT`` hook of
:mod:`fewshot_runner.engine.run` (``ACTION@PHASE:STEP``), so no test races the clock on a
loaded machine; the one external-signal test waits for the run to log a step first.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import one_error_line, real_data_root, run_cli
from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.errors import UserError

# Small nets on one thread: seconds per run, and the same arithmetic in every process.
FAST = ["debug=smoke", "backbone.hidden=8", "device.threads=1"]
# ProtoNet with an LR schedule and a weight average; checkpoints every 2 steps, logs and validates
# every 3, so the logging window is non-empty at checkpoints and kills fall between the events.
PROTO = [*FAST, "algo=protonet", "train.steps=8", "train.ckpt_every=2", "train.val_every=3", "train.log_every=3",
         "train.lr_decay_every=3", "train.lr_decay=0.5", "train.ema_decay=0.8"]
# PROTO's schedule and weight average with training augmentation (crop, flip, colour jitter: random numbers
# from torch's global generator, see data/transforms.py), checkpointing every 4 steps so that faults at steps
# 3 and 6 fall between checkpoints
AUGMENTED = [*FAST, "algo=protonet", "train.steps=8", "train.ckpt_every=4", "train.val_every=3", "train.log_every=3",
             "train.lr_decay_every=3", "train.lr_decay=0.5", "train.ema_decay=0.8",
             "data.augment.flip=true", "data.augment.crop_padding=2", "data.augment.color_jitter=0.2"]
MAML = [*FAST, "algo=maml", "train.steps=6", "train.ckpt_every=2", "train.val_every=3", "train.log_every=1",
        "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]


def fewshot(args: list[str], cwd: Path, fault: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(["train", *args], cwd, env_extra={"FEWSHOT_FAULT": fault, **(env or {})})


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stdout + p.stderr
    return p


def killed(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])


def records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def step_of(path: Path) -> int:
    return ckpt.load_checkpoint(path)["step"]


def assert_equal_tree(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), (where, a, b)


def assert_same_run(expected: Path, got: Path) -> None:
    """Bitwise the same training: every metrics.jsonl record (they hold no clock time), every
    tensor and value of last.pt and best.pt (model, optimizer, scheduler, sampler, RNGs,
    logging window, best score), and results.json.  Left out: ``wall_time`` and
    ``wall_time_s`` (elapsed seconds, a clock measurement), ``config.resume`` (how the run was
    started) and results' ``checkpoint`` (a path inside each run dir)."""
    assert records(got) == records(expected)
    seen = [(r["step"], tuple(sorted(r))) for r in records(got)]
    assert len(seen) == len(set(seen)), "duplicate metrics records"
    for name in ("last.pt", "best.pt"):
        a = torch.load(expected / "checkpoints" / name, weights_only=True)
        b = torch.load(got / "checkpoints" / name, weights_only=True)
        for s in (a, b):
            s.pop("wall_time")
            s["config"].pop("resume")
        assert_equal_tree(a, b, name)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (expected, got))
    for r in (ra, rb):
        r.pop("wall_time_s"), r.pop("checkpoint")
    assert ra == rb
    assert not list((got / "checkpoints").glob(".*.tmp")), "a torn temporary file was left behind"


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """Uninterrupted runs of PROTO and MAML (the references)."""
    root = tmp_path_factory.mktemp("baselines")
    for name, args in (("proto", PROTO), ("maml", MAML)):
        ok(fewshot([*args, f"hydra.run.dir={root / name}"], root))
    return root


@pytest.fixture(scope="module")
def augmented_baseline(tmp_path_factory) -> Path:
    """An uninterrupted AUGMENTED run (the reference of the resumes below)."""
    root = tmp_path_factory.mktemp("augmented")
    ok(fewshot([*AUGMENTED, f"hydra.run.dir={root / 'run'}"], root))
    return root / "run"


# ----------------------------------------------------------------------------- exact resume
def test_protonet_killed_at_every_phase_resumes_bitwise(tmp_path, baselines):
    """SIGKILL during a step, during validation and during a checkpoint write, each resumed
    with resume=auto: the end result equals the uninterrupted run bit for bit."""
    run = tmp_path / "run"
    args = [*PROTO, f"hydra.run.dir={run}"]

    killed(fewshot(args, tmp_path, fault="kill@step:3"))  # during step 3: the window holds steps 1-2
    assert step_of(run / "checkpoints" / "last.pt") == 2

    killed(fewshot([*args, "resume=auto"], tmp_path, fault="kill@val:6"))  # step 6 logged, then killed
    assert step_of(run / "checkpoints" / "last.pt") == 4
    assert max(r["step"] for r in records(run)) == 6  # to be cut back to 4 on resume

    before = (run / "checkpoints" / "last.pt").read_bytes()
    killed(fewshot([*args, "resume=auto"], tmp_path, fault="kill@ckpt:6"))  # half-written last.pt
    assert (run / "checkpoints" / "last.pt").read_bytes() == before  # the previous one, intact
    assert [p.name.startswith(".last.pt.") for p in (run / "checkpoints").glob(".*.tmp")] == [True]

    p = ok(fewshot([*args, "resume=auto"], tmp_path))
    assert "resuming from" in p.stdout and "at step 4" in p.stdout
    assert_same_run(baselines / "proto", run)


def test_maml_killed_during_checkpoint_write_resumes_bitwise_from_path(tmp_path, baselines):
    """resume=PATH into a new run dir brings the old run's metrics and best.pt along."""
    first, second = tmp_path / "first", tmp_path / "second"
    killed(fewshot([*MAML, f"hydra.run.dir={first}"], tmp_path, fault="kill@ckpt:4"))
    last = first / "checkpoints" / "last.pt"
    assert step_of(last) == 2
    ok(fewshot([*MAML, f"hydra.run.dir={second}", f"resume={last}"], tmp_path))
    assert_same_run(baselines / "maml", second)


def test_resume_restores_the_global_rng_so_augmented_runs_end_bitwise_equal(tmp_path, augmented_baseline,
                                                                            compose_cfg):
    """Training augmentation draws from torch's global generator: a run killed between checkpoints and
    resumed with resume=auto ends bitwise equal (weights, optimizer, everything) to an unbroken one only
    if the resume restores that generator's state as the checkpoint saved it."""
    from fewshot_runner.engine.build import build_transforms

    augment, _ = build_transforms(compose_cfg(AUGMENTED[:1] + AUGMENTED[-3:]).data)
    x = torch.rand(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = []
    for seed in (0, 0, 1):  # the premise: the augmented images depend on the global generator, and on it only
        torch.manual_seed(seed)
        draws.append(augment(x))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])

    run = tmp_path / "run"
    args = [*AUGMENTED, f"hydra.run.dir={run}"]
    killed(fewshot(args, tmp_path, fault="kill@step:6"))
    assert step_of(run / "checkpoints" / "last.pt") == 4
    p = ok(fewshot([*args, "resume=auto"], tmp_path))
    assert "at step 4" in p.stdout
    a = torch.load(augmented_baseline / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert_equal_tree(a["model"], b["model"], "last.pt model")
    assert_equal_tree(a["optimizer"], b["optimizer"], "last.pt optimizer")
    assert_same_run(augmented_baseline, run)


def test_sigint_between_checkpoints_saves_that_step_and_resumes_bitwise(tmp_path, augmented_baseline):
    """The fast tier's graceful stop: SIGINT in step 3 (checkpoints every 4 steps) finishes the step,
    writes last.pt at step 3, exits 130 naming the resume command; resume=auto ends bitwise equal."""
    run = tmp_path / "run"
    args = [*AUGMENTED, f"hydra.run.dir={run}"]
    p = fewshot(args, tmp_path, fault="int@step:3")
    assert p.returncode == 130 and "Traceback" not in p.stdout + p.stderr, p.stderr[-2000:]
    assert "stopped by SIGINT after step 3" in p.stderr and "resume=auto" in p.stderr
    assert step_of(run / "checkpoints" / "last.pt") == 3
    assert not (run / "results.json").exists()
    p = ok(fewshot([*args, "resume=auto"], tmp_path))
    assert "at step 3" in p.stdout
    assert_same_run(augmented_baseline, run)


@pytest.mark.slow
def test_graceful_stop_off_the_grid_and_kills_at_the_end_resume_exactly(tmp_path, baselines):
    """SIGINT at step 5 (a checkpoint off the ckpt_every grid), SIGKILL in the last step's
    validation, then the state a kill between the test metrics and results.json leaves: each
    resume ends bitwise equal, with the test metrics logged once."""
    run = tmp_path / "run"
    args = [*PROTO, f"hydra.run.dir={run}"]
    p = fewshot(args, tmp_path, fault="int@step:5")
    assert p.returncode == 130 and "Traceback" not in p.stdout + p.stderr, p.stderr
    assert "stopped by SIGINT after step 5" in p.stderr and "resume=auto" in p.stderr
    assert f"hydra.run.dir={run}" in p.stderr
    assert step_of(run / "checkpoints" / "last.pt") == 5
    killed(fewshot([*args, "resume=auto"], tmp_path, fault="kill@val:8"))
    ok(fewshot([*args, "resume=auto"], tmp_path))
    (run / "results.json").unlink()  # the state a kill between the test and results.json leaves
    p = ok(fewshot([*args, "resume=auto"], tmp_path))
    assert "at step 8" in p.stdout
    assert sum("test/acc" in r for r in records(run)) == 1
    assert_same_run(baselines / "proto", run)


# ----------------------------------------------------------------------------- graceful stop
def test_sigterm_finishes_the_step_checkpoints_closes_comet_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ)
    env.setdefault("FEWSHOT_DATA", str(real_data_root() or tmp_path / "no-data"))
    env.pop("COMET_API_KEY", None)
    env.update(FEWSHOT_FAULT="", COMET_ERROR_TRACKING_ENABLE="false")
    cmd = [sys.executable, "-m", "fewshot_runner.cli", "train", *FAST, "algo=protonet", "logger=comet_offline",
           "train.steps=100000", "train.val_every=100000", "train.ckpt_every=100000", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in out + err
    last_logged = records(run)[-1]["step"]
    assert f"stopped by SIGTERM after step {last_logged}" in err
    assert "resume with: fewshot train" in err and err.rstrip().endswith("resume=auto")
    assert step_of(run / "checkpoints" / "last.pt") == last_logged  # the step it was in finished
    zips = list((run / "comet").glob("*.zip"))
    assert len(zips) == 1 and f"comet offline archive: {zips[0]}" in out  # the logger was closed
    with zipfile.ZipFile(zips[0]) as zf:
        assert zf.testzip() is None


# ----------------------------------------------------------------------------- atomic writes, full disk
def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous good checkpoint")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="no space left on the device while writing .*last.pt.*intact"):
        ckpt.save_checkpoint(target, {"config": {}, "model": {}, "step": 1})
    assert target.read_bytes() == b"previous good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("{}")

    def half(f):
        f.write(b'{"test/acc": 0.')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write(target, half)
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    ckpt.atomic_write(target, lambda f: f.write(b'{"a": 1}'))
    assert target.read_text() == '{"a": 1}' and oct(target.stat().st_mode & 0o777) != "0o600"


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path):
    run = tmp_path / "run"
    p = fewshot([*PROTO, f"hydra.run.dir={run}"], tmp_path, fault="enospc@ckpt:4")
    one_error_line(p, "no space left on the device", "last.pt", "resume=auto")
    assert step_of(run / "checkpoints" / "last.pt") == 2
    assert not list((run / "checkpoints").glob(".*.tmp"))


# ----------------------------------------------------------------------------- numerical faults
def test_nan_loss_stops_naming_the_step_and_the_learning_rate(tmp_path):
    run = tmp_path / "run"
    p = fewshot([*FAST, "algo=protonet", "train.outer_lr=1e30", "train.ckpt_every=1", f"hydra.run.dir={run}"],
                tmp_path)
    assert p.returncode == 3
    one_error_line(p, "loss became nan at step 2", "learning rate", "train.outer_lr=1e+30",
                   f"last good checkpoint is {run / 'checkpoints' / 'last.pt'}", "train.on_nan=skip")
    state = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "results.json").exists()


def test_nan_loss_with_on_nan_skip_skips_that_update_and_goes_on(tmp_path):
    run = tmp_path / "run"
    p = ok(fewshot([*FAST, "algo=protonet", "train.on_nan=skip", f"hydra.run.dir={run}"], tmp_path,
                   fault="nan@step:3"))
    assert "loss became nan at step 3" in p.stdout and "update skipped" in p.stdout
    assert {"step": 3, "train/skipped_nan": 1.0} in records(run)
    state = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 4
    # batch-norm running statistics saw the NaN batch; the skip restored them
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["test/acc"] <= 1


# ----------------------------------------------------------------------------- sweeps
def test_rerun_sweep_with_resume_auto_skips_done_resumes_killed_runs_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, "algo=protonet", "train.ckpt_every=2", "train.steps=2,5,3", f"hydra.sweep.dir={sweep}"]
    killed(fewshot(args, tmp_path, fault="kill@step:4"))  # job 0 done, job 1 killed at step 4, job 2 not begun
    assert (sweep / "0" / "results.json").exists() and not (sweep / "2").exists()
    assert step_of(sweep / "1" / "checkpoints" / "last.pt") == 2
    done_before = (sweep / "0" / "results.json").read_bytes()

    one_error_line(fewshot(args, tmp_path), "already holds a run", "resume=auto")  # no silent overwrite

    p = ok(fewshot([*args, "resume=auto"], tmp_path))
    assert f"done already: {sweep / '0' / 'results.json'}" in p.stdout
    assert f"resuming from {sweep / '1' / 'checkpoints' / 'last.pt'} at step 2" in p.stdout
    assert (sweep / "0" / "results.json").read_bytes() == done_before
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["done"] * 3
    assert [r["overrides"].split()[-1] for r in rows] == ["train.steps=2", "train.steps=5", "train.steps=3"]
    assert [json.loads((sweep / str(i) / "results.json").read_text())["steps"] for i in range(3)] == [2, 5, 3]
    steps = [r["step"] for r in records(sweep / "1") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_a_killed_sweep_job_resumed_by_the_same_sweep_command_ends_bitwise_equal_to_an_unbroken_run(
        tmp_path, augmented_baseline):
    """A 2-job sweep killed in its second job (between checkpoints); the same command with resume=auto
    skips the finished job and resumes the killed one in its own folder, which then holds the same run,
    bit for bit, as the uninterrupted single run with that job's settings (AUGMENTED)."""
    sweep = tmp_path / "sweep"
    args = ["-m", *[a if a != "train.steps=8" else "train.steps=3,8" for a in AUGMENTED], f"hydra.sweep.dir={sweep}"]
    assert "train.steps=3,8" in args
    killed(fewshot(args, tmp_path, fault="kill@step:6"))  # job 0 (3 steps) done, job 1 killed in step 6
    assert (sweep / "0" / "results.json").exists() and not (sweep / "1" / "results.json").exists()
    assert step_of(sweep / "1" / "checkpoints" / "last.pt") == 4
    p = ok(fewshot([*args, "resume=auto"], tmp_path))
    assert f"done already: {sweep / '0' / 'results.json'}" in p.stdout
    assert f"resuming from {sweep / '1' / 'checkpoints' / 'last.pt'} at step 4" in p.stdout
    assert_same_run(augmented_baseline, sweep / "1")


# ----------------------------------------------------------------------------- Comet faults
def test_comet_without_a_network_falls_back_offline_and_the_end_says_so(tmp_path):
    """logger=comet with a key but nothing listening: training goes on, logs to the offline
    archive, and the last messages say where it is and how to upload it."""
    run = tmp_path / "run"
    key = "NoNetworkKey0123456789"
    p = ok(fewshot([*FAST, "algo=protonet", "logger=comet", f"hydra.run.dir={run}"], tmp_path,
                   env={"COMET_API_KEY": key, "COMET_URL_OVERRIDE": "http://127.0.0.1:9/clientlib/",
                        "COMET_ERROR_TRACKING_ENABLE": "false"}))
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    zips = list((run / "comet").glob("*.zip"))
    assert len(zips) == 1
    assert "Comet online logging failed" in p.stdout and f"logged offline to {zips[0]}" in p.stdout
    assert f"comet upload {zips[0]}" in p.stdout
    with zipfile.ZipFile(zips[0]) as zf:
        text = "".join(zf.read(n).decode("utf-8", "replace") for n in zf.namelist())
    assert "train/loss" in text and key not in text
    assert key not in p.stdout + p.stderr
