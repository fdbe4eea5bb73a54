"""Runs a user can find and compare: experiment name, tags, run info and assets in the Comet archive;
TensorBoard as a second logger; several loggers at once. No network needed."""

from __future__ import annotations

import json
import re
import socket
import sys
import zipfile
from pathlib import Path

import pytest

from fewshot_runner.errors import UserError
from fewshot_runner.loggers import (
    check_kind,
    describe_kind,
    collect_run_info,
    make_logger,
    make_run_logger,
    parse_kinds,
    run_identity,
)
from fewshot_runner.loggers import comet as comet_logger
from fewshot_runner.loggers import runinfo
from fewshot_runner.loggers import tensorboard as tb_logger
from fewshot_runner.plots import save_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _fast_comet(monkeypatch):
    """Comet's system-metrics thread costs ~1 s to join at end(); not what these tests check."""
    monkeypatch.setitem(comet_logger.COMET_KWARGS, "log_env_cpu", False)
    monkeypatch.setitem(comet_logger.COMET_KWARGS, "log_env_gpu", False)
    monkeypatch.delenv("COMET_API_KEY", raising=False)


def _archive(run_dir: Path) -> tuple[dict, list[dict], set[str]]:
    """(experiment.json, the messages, the names of the files in the zip) of the one archive there."""
    (z,) = (run_dir / "comet").glob("*.zip")
    with zipfile.ZipFile(z) as zf:
        exp = json.loads(zf.read("experiment.json"))
        msgs = [json.loads(line) for line in zf.read("messages.json").decode().splitlines()]
        return exp, msgs, set(zf.namelist())


def _others(msgs: list[dict]) -> dict:
    return {m["payload"]["key"]: m["payload"]["value"] for m in msgs if m["type"] == "log_other"}


def _uploads(msgs: list[dict]) -> list[tuple[str, str]]:
    """(upload type, file name) of the files logged: assets, images, model elements."""
    return [(m["payload"]["upload_type"], m["payload"]["additional_params"].get("fileName")
             or m["payload"]["additional_params"].get("figName")) for m in msgs if m["type"] == "file_upload"]


# ----------------------------------------------------------------------------- identity
def test_default_name_and_tags_from_the_config_and_hydra_choices(compose_cfg):
    cfg = compose_cfg(["algo=maml", "data=omniglot", "data.n_way=5", "data.n_shot=1", "seed=0"])
    name, tags = run_identity(cfg, {"algo": "maml", "data": "omniglot", "experiment": "maml_omniglot_5w1s"})
    assert name == "maml-omniglot-5w1s-seed0"
    assert tags[:3] == ["maml", "omniglot", "5w1s"] and "maml_omniglot_5w1s" in tags
    # without Hydra's choices: the class names; another training shape is a tag; eval runs say so
    cfg = compose_cfg(["algo=protonet", "data.n_way=5", "data.train_n_way=60", "seed=3"])
    name, tags = run_identity(cfg, {}, job="eval")
    assert name == "eval-prototypicalnetworks-omniglot-5w1s-seed3"
    assert "train:60w1s" in tags and "eval" in tags


def test_run_info_names_host_os_python_torch_cpu_and_git(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fewshot train", "algo=maml", "logger.comet_api_key=SECRET123", "a b=1"])
    info = collect_run_info("/tmp/some/run")
    assert info["host"] == socket.gethostname()
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["torch"] and info["os"] and info["cpu"]
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    assert info["git_dirty"] in (True, False, None)
    assert info["command"] == "fewshot train algo=maml 'logger.comet_api_key=***' 'a b=1'"
    assert "SECRET123" not in json.dumps(info)


def test_git_info_outside_a_repository_is_none(tmp_path):
    assert runinfo.git_info(tmp_path) == {"git_branch": None, "git_commit": None, "git_dirty": None}


# ----------------------------------------------------------------------------- the Comet archive
def test_offline_archive_holds_name_tags_host_info_and_assets(compose_cfg, tmp_path, monkeypatch):
    # what Hydra's running app knows (compose() alone does not)
    monkeypatch.setattr(runinfo, "hydra_choices", lambda: {"algo": "protonet", "data": "synthetic", "debug": "smoke"})
    cfg = compose_cfg(["debug=smoke", "algo=protonet", "logger=comet_offline", "logger.tags=[mine]",
                       "logger.log_model=true"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    lg = make_run_logger(cfg, run, truncate_after_step=0)
    assert "Comet offline archive in" in lg.describe() and "metrics.jsonl" in lg.describe()
    lg.log_params({"seed": 0, "algo": {"name": "protonet"}})
    lg.log_asset(run / "config.yaml")
    lg.log_metrics({"train/loss": 1.0, "train/acc": 0.5}, 1)
    (run / "results.json").write_text('{"test/acc": 0.5}\n')
    lg.log_asset(run / "results.json")
    lg.log_image(save_curves(_jsonl(run), run / "curves.png"), "curves")
    (run / "best.pt").write_bytes(b"weights")
    lg.log_model("best", run / "best.pt")
    lg.log_asset(run / "missing.json")  # a file that is not there is skipped, no error
    msgs = lg.close()
    assert msgs[0].startswith("comet offline archive:")

    exp, messages, _ = _archive(run)
    others = _others(messages)
    assert others["Name"] == "protonet-synthetic-5w1s-seed0"
    assert {"protonet", "synthetic", "5w1s", "smoke", "mine"} <= set(exp["tags"])
    for key in ("host", "os", "python", "torch", "cpu", "command"):
        assert others.get(key), key
    assert others["host"] == socket.gethostname()
    assert "git_commit" in others or runinfo.git_info(Path(runinfo.__file__).parent)["git_commit"] is None
    uploads = _uploads(messages)
    assert ("asset", "config.yaml") in uploads and ("asset", "results.json") in uploads
    assert ("model-element", "best.pt") in uploads
    assert ("visualization", "curves") in uploads  # comet's name for an image


def test_the_checkpoint_goes_to_comet_only_when_asked(compose_cfg, tmp_path):
    cfg = compose_cfg(["debug=smoke", "logger=comet_offline", "logger.experiment_name=my-run"])
    (tmp_path / "best.pt").write_bytes(b"weights")
    lg = make_run_logger(cfg, tmp_path)
    lg.log_model("best", tmp_path / "best.pt")
    lg.close()
    _, messages, _ = _archive(tmp_path)
    assert _others(messages)["Name"] == "my-run"  # logger.experiment_name wins over the default
    assert not [u for u in _uploads(messages) if u[0] == "model-element"]


def _jsonl(run: Path) -> Path:
    p = run / "src_metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s, "val/acc": 0.1 * s}) + "\n"
                         for s in range(1, 6)))
    return p


# ----------------------------------------------------------------------------- kinds
def test_logger_kinds_combine_with_plus():
    assert parse_kinds("comet_offline+tensorboard") == ["comet_offline", "tensorboard"]
    assert parse_kinds(["auto", "tensorboard"]) == ["auto", "tensorboard"]
    assert parse_kinds("none") == ["none"]
    for bad, fragment in [("wandb", "unknown logger kind 'wandb'"), ("comet+comet_offline", "one Comet experiment"),
                          ("none+tensorboard", "'none' cannot be combined"), ("", "unknown logger kind")]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            parse_kinds(bad)
    assert check_kind("comet_offline") is None
    assert describe_kind("comet_offline+tensorboard", "/r") == ("/r/metrics.jsonl; Comet offline archive in /r/comet; "
                                                                "TensorBoard events in /r/tensorboard")
    assert "comet_offline" in check_kind("wandb")  # the one line names the choices


def test_tensorboard_missing_is_one_line_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(tb_logger.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else object())
    assert "pip install tensorboard" in check_kind("comet_offline+tensorboard")
    with pytest.raises(UserError, match="pip install tensorboard"):
        make_logger("tensorboard", tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_tensorboard_and_comet_at_once(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(runinfo, "hydra_choices", lambda: {"algo": "protonet", "data": "synthetic"})
    pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install -e '.[dev]' installs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg(["debug=smoke", "algo=protonet", "logger=comet_offline",
                       "logger.kind=comet_offline+tensorboard"])
    lg = make_run_logger(cfg, tmp_path, truncate_after_step=0)
    assert [type(x).__name__ for x in lg.loggers] == ["JSONLLogger", "CometLogger", "TensorBoardLogger"]
    lg.log_params({"seed": 0, "algo": {"inner_lr": 0.4, "hidden": [64, 64]}})
    for s in (1, 2, 3):
        lg.log_metrics({"train/loss": 1.0 / s, "train/acc": 0.3 * s}, s)
    lg.log_metrics({"val/acc": 0.75, "test/acc": 0.8}, 3)
    lg.log_image(save_curves(_jsonl(tmp_path), tmp_path / "curves.png"), "curves")
    (tmp_path / "results.json").write_text('{"test/acc": 0.8}')
    lg.log_asset(tmp_path / "results.json")
    msgs = lg.close()
    assert any(m.startswith("comet offline archive:") for m in msgs)
    assert any(m.startswith("tensorboard: tensorboard --logdir") for m in msgs)
    _archive(tmp_path)  # the Comet archive is there too

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert acc.Images("curves")
    texts = set(acc.Tags()["tensors"])
    assert {"run/info/text_summary", "run/config/text_summary", "files/results.json/text_summary"} <= texts
    name = acc.Tensors("run/name/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "protonet-synthetic-5w1s-seed0" in name


def test_tensorboard_resumed_run_hides_the_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install -e '.[dev]' installs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lg = make_logger("tensorboard", tmp_path)
    for s in range(1, 6):
        lg.log_metrics({"train/loss": float(s)}, s)
    lg.close()
    lg = make_logger("tensorboard", tmp_path, truncate_after_step=3)  # resumed from step 3's checkpoint
    lg.log_metrics({"train/loss": 40.0}, 4)
    lg.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
