"""Loggers (metrics.jsonl, Comet online/offline with fallback) and plots. No network needed."""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import pytest

from fewshot_runner import loggers as L
from fewshot_runner.loggers import comet as comet_logger
from fewshot_runner.loggers import comet_connect
from fewshot_runner.loggers import CometLogger, JSONLLogger, MultiLogger, flatten, make_logger
from fewshot_runner.plots import save_curves, save_sweep_summary_plot

FAKE_KEY = "abcdef123456"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _zip_from(messages: list[str]) -> Path:
    m = re.search(r"comet upload (\S+\.zip)", " ".join(messages))
    assert m, messages
    z = Path(m.group(1))
    assert z.is_file()
    return z


def _zip_text(z: Path) -> str:
    with zipfile.ZipFile(z) as zf:
        return "".join(zf.read(n).decode("utf-8", "replace") for n in zf.namelist())


def _log_some(lg, png: Path | None = None) -> None:
    lg.log_params({"algo": {"name": "protonet", "inner_lr": 0.4}, "comet": {"api_key": FAKE_KEY}})
    lg.log_other("git_commit", "0123abcd")
    for step in (1, 2, 3):
        lg.log_metrics({"train/loss": 1.5 / step, "train/acc": 0.25 * step}, step)
    lg.log_metrics({"val/acc": 0.6789}, 3)
    if png is not None:
        lg.log_image(png, "curves")


@pytest.fixture(autouse=True)
def _fast_comet(monkeypatch):
    """Comet's system-metrics thread costs ~1 s to join at end(); not what these tests check."""
    monkeypatch.setitem(comet_logger.COMET_KWARGS, "log_env_cpu", False)
    monkeypatch.setitem(comet_logger.COMET_KWARGS, "log_env_gpu", False)
    # comet_ml's console handler keeps the sys.stderr of the test that first imported it (a
    # pytest capture that is closed by now); point it at this test's stream
    import logging
    import sys

    for h in logging.getLogger("comet_ml").handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
            monkeypatch.setattr(h, "stream", sys.stderr)


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("COMET_API_KEY", raising=False)


@pytest.fixture
def fake_key(monkeypatch):
    monkeypatch.setenv("COMET_API_KEY", FAKE_KEY)


# --------------------------------------------------------------------------- JSONL / flatten


def test_jsonl_lines_and_steps(tmp_path):
    lg = JSONLLogger(tmp_path / "m.jsonl")
    lg.log_metrics({"train/loss": 1.0, "train/acc": 0.5}, 1)
    lg.log_metrics({"val/acc": 0.75}, 2)
    # flushed per line: readable before close
    assert _lines(tmp_path / "m.jsonl") == [{"step": 1, "train/loss": 1.0, "train/acc": 0.5},
                                            {"step": 2, "val/acc": 0.75}]
    assert lg.close() == []
    lg.log_metrics({"x": 1.0}, 3)  # after close: ignored, no crash


def test_jsonl_truncate_after_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lg = JSONLLogger(path)
    for s in range(1, 6):
        lg.log_metrics({"train/loss": float(s)}, s)
    lg.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "train/lo')  # torn line from a crash
    lg = JSONLLogger(path, truncate_after_step=3)
    assert [r["step"] for r in _lines(path)] == [1, 2, 3]
    lg.log_metrics({"train/loss": 40.0}, 4)
    lg.close()
    assert [r["step"] for r in _lines(path)] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))
    # no truncation asked: appends
    lg = JSONLLogger(path)
    lg.log_metrics({"train/loss": 5.0}, 5)
    lg.close()
    assert [r["step"] for r in _lines(path)] == [1, 2, 3, 4, 5]


def test_flatten_drops_api_keys():
    cfg = {"a": {"b": {"c": 1}, "d": [1, 2]}, "logger": {"API_KEY": "x", "comet_api_key": "y", "apiKey": "z",
                                                         "kind": "auto"}, "api_key": {"nested": 1}, "lr": 0.1}
    assert flatten(cfg) == {"a.b.c": 1, "a.d": [1, 2], "logger.kind": "auto", "lr": 0.1}


# --------------------------------------------------------------------------- Comet offline


def test_comet_offline_archive(tmp_path, fake_key, capsys):
    png = save_curves(_write_metrics(tmp_path / "src.jsonl"), tmp_path / "c.png")
    lg = make_logger("comet_offline", tmp_path, project_name="proj", experiment_name="exp1", tags=["t1"])
    assert isinstance(lg, MultiLogger)
    assert [type(x).__name__ for x in lg.loggers] == ["JSONLLogger", "CometLogger"]
    assert lg.loggers[1].mode == "offline"
    _log_some(lg, png)
    msgs = lg.close()
    assert lg.close() == []  # idempotent
    assert len(msgs) == 1 and msgs[0].startswith("comet offline archive: ")
    z = _zip_from(msgs)
    assert z.parent == tmp_path / "comet"
    assert ("train/loss", 0.75, 2) in _metrics_in_zip(z) and ("val/acc", 0.6789, 3) in _metrics_in_zip(z)
    text = _zip_text(z)
    for needle in ("0.6789", "train/loss", "algo.inner_lr", "0123abcd", "exp1"):
        assert needle in text, needle
    assert FAKE_KEY not in text
    jsonl = (tmp_path / "metrics.jsonl").read_text()
    assert "0.6789" in jsonl and FAKE_KEY not in jsonl
    out = capsys.readouterr()
    assert FAKE_KEY not in out.out + out.err
    assert "Traceback" not in out.err


# --------------------------------------------------------------------------- auto / fallback


def test_auto_without_key_is_offline(tmp_path, no_key):
    lg = make_logger("auto", tmp_path)
    assert lg.loggers[1].mode == "offline"
    lg.log_metrics({"train/loss": 0.5}, 1)
    msgs = lg.close()
    assert msgs[0].startswith("comet offline archive:")
    _zip_from(msgs)


def test_comet_without_key_falls_back(tmp_path, no_key):
    lg = make_logger("comet", tmp_path)
    msgs = lg.close()
    assert "COMET_API_KEY is not set" in msgs[0] and "upload later with: comet upload" in msgs[0]


def test_auto_fake_key_no_network_falls_back(tmp_path, fake_key, capsys):
    """The fast path: the TCP probe of comet's server fails (no network here)."""
    lg = make_logger("auto", tmp_path)
    c = lg.loggers[1]
    assert c.mode == "offline" and c._fallback_reason
    _log_some(lg)
    msgs = lg.close()
    assert msgs[0].startswith("Comet online logging failed (") and "logged offline to" in msgs[0]
    text = _zip_text(_zip_from(msgs))
    assert "0.6789" in text and FAKE_KEY not in text
    out = capsys.readouterr()
    assert FAKE_KEY not in out.out + out.err + " ".join(msgs)


def test_fake_key_alive_false_falls_back(tmp_path, fake_key, monkeypatch, capsys):
    """Skip the probe: comet's own Experiment comes up with alive=False; the bounded
    retries make that take ~0 s instead of ~30 s when DNS fails."""
    monkeypatch.setattr(comet_logger, "probe_backend", lambda comet_ml: None)
    lg = make_logger("comet", tmp_path)
    assert lg.loggers[1].mode == "offline"
    _log_some(lg)
    msgs = lg.close()
    assert "Comet online logging failed (" in msgs[0]
    text = _zip_text(_zip_from(msgs))
    assert "0.6789" in text and FAKE_KEY not in text
    err = capsys.readouterr().err
    assert "Traceback" not in err and FAKE_KEY not in err
    # the retry settings were lowered only while creating the experiment
    assert all(k not in os.environ for k in comet_connect._CONNECT_RETRY_ENV)


class _FlakyOnline:
    """Stands in for comet_ml.Experiment: alive, then log_metrics raises at step 2."""

    def __init__(self, **kwargs):
        assert kwargs["api_key"] == FAKE_KEY and kwargs["auto_param_logging"] is False
        self.alive = True
        self.url = "https://comet.example/exp"
        self.ended = False

    def set_offline_zip_uploader(self, cb):
        pass

    def set_name(self, n):
        pass

    def add_tags(self, t):
        pass

    def log_parameters(self, p):
        pass

    def log_other(self, k, v):
        pass

    def log_metrics(self, m, step):
        if step >= 2:
            raise ConnectionError("server went away")

    def end(self):
        self.ended = True


def test_online_dies_mid_run_switches_to_offline(tmp_path, fake_key, monkeypatch):
    import comet_ml

    monkeypatch.setattr(comet_logger, "probe_backend", lambda comet_ml: None)
    monkeypatch.setattr(comet_ml, "Experiment", _FlakyOnline)
    notes = []
    lg = CometLogger("online", tmp_path, notify=notes.append)
    assert lg.mode == "online" and notes == ["Comet experiment: https://comet.example/exp"]
    _log_some(lg)  # raises at step 2 -> offline, replaying steps 1..
    assert lg.mode == "offline"
    assert "mid-run" in notes[-1]
    msgs = lg.close()
    assert "server went away" in msgs[0]
    text = _zip_text(_zip_from(msgs))
    assert "0.6789" in text and "algo.inner_lr" in text and FAKE_KEY not in text
    logged = _metrics_in_zip(_zip_from(msgs))
    assert {s for n, _, s in logged if n == "train/loss"} == {1, 2, 3}
    assert ("val/acc", 0.6789, 3) in logged


def _metrics_in_zip(z: Path) -> list[tuple[str, float, int]]:
    """(name, value, step) of the metric messages in an offline archive (messages.json is JSON lines)."""
    with zipfile.ZipFile(z) as zf:
        lines = zf.read("messages.json").decode().splitlines()
    out = []
    for line in lines:
        msg = json.loads(line)
        if msg.get("type") == "metric_msg":
            m = msg["payload"]["metric"]
            out.append((m["metricName"], m["metricValue"], m["step"]))
    return out


def test_make_logger_none_and_bad_kind(tmp_path):
    lg = make_logger("none", tmp_path, truncate_after_step=None)
    assert [type(x).__name__ for x in lg.loggers] == ["JSONLLogger"]
    lg.log_metrics({"a": 1.0}, 1)
    assert lg.close() == []
    assert not (tmp_path / "comet").exists()
    with pytest.raises(ValueError, match="unknown logger kind"):
        make_logger("wandb", tmp_path)


# --------------------------------------------------------------------------- plots


def _write_metrics(path: Path) -> Path:
    lg = JSONLLogger(path)
    for s in range(1, 21):
        lg.log_metrics({"train/loss": 2.0 / s, "train/acc": min(1.0, 0.05 * s), "train/lr": 1e-3}, s)
        if s % 5 == 0:
            lg.log_metrics({"val/acc": 0.04 * s, "val/ci95": 0.01}, s)
    lg.close()
    return path


def test_save_curves_png(tmp_path):
    out = save_curves(_write_metrics(tmp_path / "metrics.jsonl"), tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_save_curves_no_data(tmp_path):
    assert save_curves(tmp_path / "missing.jsonl", tmp_path / "c.png") is None
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "test/acc": 0.5}\n')
    assert save_curves(tmp_path / "empty.jsonl", tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_save_sweep_summary_plot(tmp_path):
    rows = [{"job": "0: algo=protonet", "test/acc": 0.71, "test/ci95": 0.012},
            {"job": "1: algo=maml", "test/acc": 0.65, "test/ci95": 0.015},
            {"job": "2: failed", "test/acc": None, "test/ci95": None}]
    out = save_sweep_summary_plot(rows, tmp_path / "summary.png")
    assert out is not None and out.read_bytes()[:8] == PNG_MAGIC
    assert save_sweep_summary_plot([], tmp_path / "none.png") is None


def test_fewshot_eval_logs_its_result_to_comet_offline(compose_cfg, tmp_path, no_key):
    """`fewshot eval ... logger=comet_offline`: the result at the checkpoint's step, the eval settings
    and the checkpoint's training config go into the archive, whose upload command is printed."""
    from fewshot_runner.engine.eval_checkpoint import evaluate_checkpoint
    from fewshot_runner.engine.run import train

    train(compose_cfg(["debug=smoke", "algo=protonet", "backbone.hidden=8"]), run_dir=tmp_path / "run")
    cfg = compose_cfg([f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "device=cpu",
                       "eval.n_episodes=6", "logger=comet_offline", "logger.experiment_name=re-test"], name="eval")
    res = evaluate_checkpoint(cfg, run_dir=tmp_path / "ev")
    (z,) = (tmp_path / "ev" / "comet").glob("*.zip")
    assert ("test/acc", pytest.approx(res["test/acc"]), 4) in [(k, v, s) for k, v, s in _metrics_in_zip(z)]
    text = _zip_text(z)
    for needle in ("eval.n_episodes", "trained.algo._target_", "re-test", "best.pt"):
        assert needle in text, needle
    assert _lines(tmp_path / "ev" / "metrics.jsonl") == [
        {"step": 4, "test/acc": res["test/acc"], "test/ci95": res["test/ci95"], "test/n_episodes": 6}]
