"""The bad-input matrix: the real `fewshot` CLI in a subprocess against wrong override keys and
types, impossible episode shapes, missing and corrupt data, corrupt, truncated, foreign and
unsafe checkpoints, a checkpoint of another algorithm, unwritable output folders and
device=cuda without a GPU.

Each case must exit non-zero with exactly one line on stderr (``error: `` + the problem and
its fix), print no traceback, and change no file that existed before: a prepared folder
holding a finished run, bad checkpoints and bad data is compared byte for byte (and by
modification time) before and after every case.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli


class _WritesMarker:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A finished run, bad checkpoints and bad data sets, prepared once."""
    from hydra import compose, initialize_config_dir

    from fewshot_runner.cli import conf_dir
    from fewshot_runner.engine.run import train

    w = tmp_path_factory.mktemp("world")
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=smoke", "algo=protonet", "backbone.hidden=4",
                                                      "device.threads=1", "train.steps=2", "eval.n_episodes=4"])
    train(cfg, run_dir=w / "run")
    last = w / "run" / "checkpoints" / "last.pt"
    good = last.read_bytes()

    bad = w / "bad"
    bad.mkdir()
    (bad / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 100)
    (bad / "truncated.pt").write_bytes(good[: len(good) // 2])
    (bad / "empty.pt").write_bytes(b"")
    torch.save({"weight": torch.ones(3, 3), "bias": torch.zeros(3)}, bad / "foreign_state_dict.pt")
    state = torch.load(last, weights_only=True)
    torch.save({**state, "format": 99}, bad / "format99.pt")
    torch.save({**state, "evil": _WritesMarker(w / "PWNED")}, bad / "pickled_code.pt")
    torch.save({**state, "optimizer": None, "sampler": "x"}, bad / "no_training_state.pt")
    cosine = {**state["config"], "train": {**state["config"]["train"], "lr_schedule": "cosine"}}
    torch.save({**state, "config": cosine}, bad / "cosine_2_steps.pt")  # as a cosine run of train.steps=2 writes
    newer = {**state["config"], "algo": {**state["config"]["algo"], "support_resplits": 16}}
    torch.save({**state, "config": newer}, bad / "unknown_algo_option.pt")  # as a build with that option writes
    (bad / "a_folder.pt").mkdir()
    (w / "not_a_folder.txt").write_text("a file where a folder is expected\n")

    # a run dir whose last.pt was torn (no results.json): resume=auto in it must refuse it
    shutil.copytree(w / "run", w / "torn_run")
    (w / "torn_run" / "results.json").unlink()
    (w / "torn_run" / "checkpoints" / "last.pt").write_bytes(good[:1000])

    # a valid Omniglot layout with two characters (one per image set): too few for split_scheme=maml
    import io
    import zipfile

    from PIL import Image

    png = io.BytesIO()
    Image.new("1", (105, 105), 1).save(png, format="PNG")
    (w / "fake_omniglot").mkdir()
    for set_name, member in (("images_background", "Alpha/character01/0001_01.png"),
                             ("images_evaluation", "Beta/character01/0002_01.png")):
        with zipfile.ZipFile(w / "fake_omniglot" / f"{set_name}.zip", "w") as zf:
            zf.writestr(f"{set_name}/{member}", png.getvalue())

    (w / "omniglot_empty").mkdir()
    corrupt = w / "omniglot_corrupt"
    corrupt.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        (corrupt / name).write_bytes(b"PK\x03\x04 this is not really a zip file" * 10)
    return w


def snapshot(folder: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(folder))] = (digest, st.st_size if p.is_file() else 0,
                                           st.st_mtime_ns if p.is_file() else 0)
    return out


LAST = "{w}/run/checkpoints/last.pt"
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: device=cuda is valid here")

# (command and overrides, fragments the one stderr line must contain); {w} is the prepared
# folder, {out} a fresh output folder.  Every train case runs with debug=smoke.
CASES = {
    # --- override keys, types and values (answered before torch is imported)
    "unknown key": (["train", "train.stepz=3"], ["unknown config key 'train.stepz'", "--help"]),
    "unknown algo key": (["train", "algo.inner_lrr=0.1"], ["algo.inner_lrr"]),
    "unknown algo": (["train", "algo=nope"], ["unknown algo=nope", "maml", "protonet"]),
    "unknown data set": (["train", "data=imagenet9"], ["unknown data=imagenet9", "omniglot", "synthetic"]),
    "float expected": (["train", "algo.inner_lr=abc"], ["algo.inner_lr=abc", "float"]),
    "int expected": (["train", "train.steps=ten"], ["train.steps=ten", "integer"]),
    "normalisation of another channel count": (["train", "debug=smoke", "data.normalize.mean=[0.5,0.5]",
                                                "data.normalize.std=[0.2,0.2]"], ["has 2 values", "one value per channel"]),
    "unknown optimizer": (["train", "optimizer=lamb"], ["unknown optimizer=lamb", "adam"]),
    "bool expected": (["train", "train.progress=maybe"], ["train.progress=maybe", "true or false"]),
    "null for a number": (["train", "data.n_way=null"], ["data.n_way cannot be null"]),
    "override without value": (["train", "train.steps"], ["cannot parse the override 'train.steps'", "key=value"]),
    "unbalanced bracket": (["train", "data.n_way=[5"], ["cannot parse the overrides", "key=value"]),
    "zero-way episodes": (["train", "data.n_way=0"], ["data.n_way=0", "positive"]),
    "negative steps": (["train", "train.steps=-5"], ["train.steps=-5", "positive"]),
    "unknown on_nan": (["train", "train.on_nan=ignore"], ["train.on_nan=ignore", "stop, skip"]),
    "unknown precision": (["train", "device.precision=fp8"], ["device.precision=fp8", "fp32, bf16, auto"]),
    "unknown batch_tasks": (["train", "device.batch_tasks=yes"], ["device.batch_tasks=yes", "auto, on, groups, off"]),
    "unknown channels_last": (["train", "device.channels_last=sometimes"],
                              ["device.channels_last='sometimes'", "off, on, auto"]),
    "zero task threads": (["train", "device.task_threads=0"], ["device.task_threads='0'", "whole number >= 1"]),
    "unknown train split": (["train", "train.split=test"], ["train.split=test", "train, trainval"]),
    "unknown lr schedule": (["train", "train.lr_schedule=linear"], ["train.lr_schedule=linear", "step, cosine"]),
    "lr_min above 1": (["train", "train.lr_schedule=cosine", "train.lr_min=2"], ["train.lr_min=2", "between 0 and 1"]),
    "ema_decay of 1": (["train", "train.ema_decay=1"], ["train.ema_decay=1", "in (0, 1)"]),
    "compile with MAML": (["train", "algo=maml", "device.compile=true"], ["device.compile=true", "device.compile=false"]),
    "compile with a learner that cannot be imported": (
        ["train", "algo._target_=fewshot_runner.algorithms.Nope", "device.compile=true"],
        ["algo._target_=fewshot_runner.algorithms.Nope cannot be imported", "algo=NAME"]),
    "unknown logger kind": (["train", "logger.kind=wandb"], ["logger.kind=wandb", "comet_offline"]),
    "bad value in one sweep job": (["train", "-m", "data.n_way=5,0", "hydra.sweep.dir={out}"], ["data.n_way=0"]),
    "unknown key added with +": (["train", "+nosuch.key=1"], ["unknown config key 'nosuch.key' (added with +)", "--help"]),
    "unknown key added with ++": (["train", "++train.stepz=3"], ["unknown config key 'train.stepz' (added with ++)"]),
    "unknown learner key added with +": (["train", "algo=maml", "+algo.inner_lrr=0.1"], ["'algo.inner_lrr'"]),
    "unknown eval key added with +": (["eval", "checkpoint={w}/run/checkpoints/last.pt", "+data.nway=20", "device=cpu"],
                                      ["unknown config key 'data.nway'"]),
    "preset with another data set": (["train", "experiment=siamese_omniglot_lake", "data=synthetic"],
                                     ["experiment=siamese_omniglot_lake sets data.split_scheme", "SyntheticConfig",
                                      "with its own data"]),
    "one-way episodes": (["train", "data.n_way=1"], ["data.n_way=1", "a single class", "data.n_way=2 or more"]),
    "one-way training episodes": (["train", "data.train_n_way=1"], ["data.train_n_way=1", "data.train_n_way=2"]),
    "one-way eval episodes": (["eval", "checkpoint={w}/run/checkpoints/last.pt", "data.n_way=1", "device=cpu"],
                              ["data.n_way=1", "2 or more"]),
    "unknown command": (["trian"], ["unknown command 'trian'", "train, eval"]),
    "eval without checkpoint": (["eval", "device=cpu"], ["missing value for checkpoint", "checkpoint="]),
    # --- output folders
    "run dir under a file": (["train", "hydra.run.dir={w}/not_a_folder.txt/run"],
                             ["not_a_folder.txt is a file, not a folder", "hydra.run.dir="]),
    "run dir in /proc": (["train", "hydra.run.dir=/proc/fewshot_no_such/run"], ["cannot write to", "hydra.run.dir="]),
    "sweep dir under a file": (["train", "-m", "algo=maml,protonet", "hydra.sweep.dir={w}/not_a_folder.txt/s"],
                               ["is a file, not a folder", "hydra.sweep.dir="]),
    "run dir holding a finished run": (["train", "hydra.run.dir={w}/run"], ["already holds a run", "resume=auto"]),
    # --- device
    "cuda without a GPU": (["train", "device=cuda"], ["no CUDA GPU", "device=cpu"]),
    # --- checkpoints to resume from or to evaluate
    "missing checkpoint": (["train", "resume={w}/nope.pt"], ["checkpoint not found", "fewshot train"]),
    "checkpoint is a folder": (["train", "resume={w}/bad/a_folder.pt"], ["is a folder", ".pt file"]),
    "text file as checkpoint": (["train", "resume={w}/bad/garbage.pt"], ["garbage.pt is not a fewshot checkpoint (a text file)", "last.pt"]),
    "truncated checkpoint": (["train", "resume={w}/bad/truncated.pt"], ["truncated.pt is corrupt", "truncated"]),
    "empty checkpoint": (["train", "resume={w}/bad/empty.pt"], ["empty.pt is empty (0 bytes)", "fewshot train"]),
    "foreign checkpoint": (["train", "resume={w}/bad/foreign_state_dict.pt"], ["not a fewshot checkpoint"]),
    "checkpoint of a future format": (["train", "resume={w}/bad/format99.pt"], ["format 99", "format 1"]),
    "checkpoint with pickled code": (["train", "resume={w}/bad/pickled_code.pt"], ["refused for safety"]),
    "checkpoint of another algorithm": (["train", "algo=maml", f"resume={LAST}"],
                                        ["PrototypicalNetworks", "not fewshot_runner.algorithms.maml.MAML", "algo="]),
    "checkpoint of another backbone size": (["train", "algo=protonet", "backbone.hidden=16", f"resume={LAST}"],
                                            ["does not fit this model", "config.yaml"]),
    "checkpoint without training state": (["train", "algo=protonet", "backbone.hidden=4",
                                           "resume={w}/bad/no_training_state.pt"], ["training state", "resume="]),
    "resume=auto in a run with a torn last.pt": (["train", "resume=auto", "hydra.run.dir={w}/torn_run"],
                                                ["torn_run/checkpoints/last.pt is corrupt"]),
    "eval of a corrupt checkpoint": (["eval", "checkpoint={w}/bad/truncated.pt", "device=cpu"], ["is corrupt"]),
    "eval of a text file": (["eval", "checkpoint={w}/not_a_folder.txt", "device=cpu"],
                            ["not_a_folder.txt is not a fewshot checkpoint (a text file)", "fewshot train"]),
    "eval of an empty file": (["eval", "checkpoint={w}/bad/empty.pt", "device=cpu"], ["empty.pt is empty (0 bytes)"]),
    "eval of a checkpoint with pickled code": (["eval", "checkpoint={w}/bad/pickled_code.pt", "device=cpu"],
                                               ["refused for safety"]),
    "eval into a training run's folder": (["eval", f"checkpoint={LAST}", "device=cpu", "hydra.run.dir={w}/run"],
                                          ["already holds a run (results.json)", "new hydra.run.dir"]),
    "eval of a checkpoint with an option this version lacks": (
        ["eval", "checkpoint={w}/bad/unknown_algo_option.pt", "device=cpu"],
        ["unexpected keyword argument 'support_resplits'", "the version (commit) that wrote it"]),
    # --- data and episode shapes (checked once the data set is built)
    "more ways than classes": (["train", "data.n_way=100"], ["data.n_way=100", "classes", "data.n_way<="]),
    "more shots than images": (["train", "data.n_shot=10", "data.n_query=15"], ["images per class", "data.n_shot"]),
    "eval with more ways than test classes": (["eval", f"checkpoint={LAST}", "data.n_way=100", "device=cpu"],
                                              ["data.n_way=100", "classes"]),
    "unknown Omniglot split scheme": (["train", "data=omniglot", "data.split_scheme=alphabets"],
                                      ["unknown Omniglot split scheme 'alphabets'", "maml or vinyals"]),
    "maml split on too few characters": (["train", "data=omniglot", "data.split_scheme=maml", "data.root={w}/fake_omniglot"],
                                         ["split_scheme=maml needs more than 1200 characters", "vinyals"]),
    "resume with another learning rate": (["train", "algo=protonet", "backbone.hidden=4", "train.outer_lr=0.01",
                                           f"resume={LAST}"], ["was trained with train.outer_lr=0.001", "resume with"]),
    "resume with a weight average the run did not have": (
        ["train", "algo=protonet", "backbone.hidden=4", "train.ema_decay=0.9", f"resume={LAST}"],
        ["was trained with train.ema_decay=0.0", "resume with train.ema_decay=0.0"]),
    "resume a cosine schedule for more steps": (["train", "algo=protonet", "backbone.hidden=4", "train.steps=10",
                                                 "train.lr_schedule=cosine", "resume={w}/bad/cosine_2_steps.pt"],
                                                ["train.steps=2", "cosine schedule is fixed to its steps"]),
    "task chunks on a learner whose tasks share batch norm": (
        ["train", "algo=protonet", "train.meta_batch_size=4", "train.task_chunk=2"],
        ["train.task_chunk splits a meta-batch", "PrototypicalNetworks", "lower train.meta_batch_size"]),
    "CUDA graphs without a GPU": (["train", "device.cuda_graphs=on"], ["device.cuda_graphs=on needs a CUDA GPU"]),
    "a negative memory cap": (["train", "device.memory_cap_mb=-5"], ["device.memory_cap_mb=-5", "positive"]),
    "grouped tasks on a non-conv backbone": (["train", "algo=maml", "backbone=mlp", "device.batch_tasks=groups"],
                                             ["batch_tasks=groups needs a Conv4 backbone", "device.batch_tasks=on"]),
    "missing Omniglot": (["train", "data=omniglot", "data.root={w}/omniglot_empty"],
                         ["no Omniglot data", "data.download=true"]),
    "corrupt Omniglot zips": (["train", "data=omniglot", "data.root={w}/omniglot_corrupt"],
                              ["not a readable zip", "download it again"]),
}
MARKS = {"cuda without a GPU": [NO_GPU]}


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS.get(n, []), id=n) for n in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, tmp_path, name):
    argv, fragments = CASES[name]
    fill = {"w": str(world), "out": str(tmp_path / "out")}
    args = [a.format(**fill) for a in argv]
    if args[0] == "train":
        args.insert(1, "debug=smoke")
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args) and args[0] in ("train", "eval"):
        args.append(f"hydra.run.dir={tmp_path / 'out'}")
    before = snapshot(world)
    p = run_cli(args, tmp_path, env_extra={"FEWSHOT_FAULT": ""})
    assert p.returncode != 0, p.stdout[-1500:]
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    for f in fragments:
        assert f.format(**fill) in lines[0], (f, lines[0])
    assert snapshot(world) == before, "a file of the prepared folder changed"
    assert not (world / "PWNED").exists()
    # a refused run leaves no run dir, even where the check came after Hydra made one (data, checkpoint shape)
    out = tmp_path / "out"
    assert not out.exists(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    if "checkpoint" in name or name.startswith(("eval of", "resume")):  # the user's words, not exception classes
        assert not re.search(r"\(\w*(Error|Exception)\)", lines[0]), lines[0]


def test_the_matrix_has_at_least_25_distinct_cases():
    assert len(CASES) >= 25
    assert len({tuple(a) for a, _ in CASES.values()}) == len(CASES)


def test_a_step_schedule_run_resumed_with_more_steps_goes_on_to_them(world, tmp_path):
    """The schedule check refuses only what the restored optimizer would silently ignore: a step (or
    constant) schedule may be extended."""
    import json

    p = run_cli(["train", "debug=smoke", "algo=protonet", "backbone.hidden=4", "device.threads=1", "train.steps=4",
                 "eval.n_episodes=4", f"resume={LAST.format(w=world)}", f"hydra.run.dir={tmp_path / 'more'}"],
                tmp_path, env_extra={"FEWSHOT_FAULT": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming from" in p.stdout and "at step 2" in p.stdout
    assert json.loads((tmp_path / "more" / "results.json").read_text())["steps"] == 4
