"""Sweeps that survive a failing job: the failure recorded, the others run, a summary with one column per
swept key names it, and the sweep exits non-zero at the end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fewshot_runner.engine.sweep import (
    ERROR_LOG,
    FAILED_FILE,
    SweepSummary,
    collect_rows,
    job_failed,
    record_failure,
    swept_and_constant,
    write_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _job(sweep: Path, num: int, overrides: list[str], results: dict | None = None, error: str | None = None) -> Path:
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (d / "results.json").write_text(json.dumps(results))
    if error is not None:
        record_failure(d, error, 2)
    return d


def _fake_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["debug=smoke", "data.n_way=50", "algo.inner_lr=0.4"],
         error="data.n_way=50: the train split has 20 classes; use data.n_way <= 20")
    _job(sweep, 1, ["debug=smoke", "data.n_way=5", "algo.inner_lr=0.4"],
         results={"val/best_acc": 0.61234, "test/acc": 0.987654, "test/ci95": 0.00321, "wall_time_s": 12.7})
    _job(sweep, 2, ["debug=smoke", "data.n_way=5", "algo.inner_lr=0.1", "resume=auto"],
         results={"val/best_acc": 0.5, "test/acc": 0.25, "test/ci95": 0.05, "wall_time_s": 3.2})
    return sweep


def test_swept_keys_are_columns_constant_keys_go_to_the_title(tmp_path):
    sweep = _fake_sweep(tmp_path)
    rows = collect_rows(sweep)
    assert [r["status"] for r in rows] == ["failed", "done", "done"]
    assert "resume=auto" not in rows[2]["overrides"]  # how it ran, not what it is
    swept, constant = swept_and_constant(rows, ["debug=smoke", "data.n_way=50,5", "algo.inner_lr=0.4,0.1"])
    assert swept == ["data.n_way", "algo.inner_lr"] and constant == {"debug": "smoke"}

    s = write_summary(sweep, ["debug=smoke", "data.n_way=50,5", "algo.inner_lr=0.4,0.1"])
    assert [p.name for p in s.files] == ["summary.csv", "summary.md", "summary.png"]
    table = list(csv.DictReader(open(sweep / "summary.csv")))
    assert list(table[0])[:3] == ["job", "data.n_way", "algo.inner_lr"]
    assert [r["data.n_way"] for r in table] == ["50", "5", "5"]
    assert [r["status"] for r in table] == ["failed", "done", "done"]
    assert float(table[1]["test/acc"]) == 0.987654  # raw in the csv
    assert "20 classes" in table[0]["error"]

    md = (sweep / "summary.md").read_text()
    assert md.splitlines()[0] == "# sweep: debug=smoke"
    assert "| job | data.n_way | algo.inner_lr | status |" in md
    assert "| 1 | 5 | 0.4 | done | 61.23 | 98.77 ± 0.32 | 13 |" in md  # rounded for reading, in %
    assert "job 0 (debug=smoke data.n_way=50 algo.inner_lr=0.4): failed: data.n_way=50" in md
    assert (sweep / "summary.png").read_bytes()[:8] == PNG_MAGIC


def test_a_key_differing_between_jobs_is_swept_without_the_command_line(tmp_path):
    sweep = _fake_sweep(tmp_path)
    swept, constant = swept_and_constant(collect_rows(sweep))
    assert swept == ["data.n_way", "algo.inner_lr"] and constant == {"debug": "smoke"}


def test_a_job_killed_without_a_record_counts_as_not_finished(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["train.steps=2"], results={"test/acc": 0.5, "test/ci95": 0.1, "wall_time_s": 1.0})
    d = _job(sweep, 1, ["train.steps=5"])
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "last.pt").write_bytes(b"x")
    _job(sweep, 2, ["train.steps=3"])
    assert [r["status"] for r in collect_rows(sweep)] == ["done", "interrupted", "failed"]


def test_job_failed_keeps_the_traceback_of_an_unexpected_error(tmp_path, capsys):
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError as e:
        job_failed(tmp_path / "3", e, None)
    rec = json.loads((tmp_path / "3" / FAILED_FILE).read_text())
    assert rec == {"error": "RuntimeError: boom", "exit_code": 1, "traceback": ERROR_LOG}
    assert "Traceback" in (tmp_path / "3" / ERROR_LOG).read_text()
    err = capsys.readouterr().err
    assert "job 3 failed: RuntimeError: boom" in err and "the sweep goes on" in err


def test_the_callback_prints_the_summary_files_and_exits_non_zero(tmp_path, capsys):
    from omegaconf import OmegaConf

    sweep = _fake_sweep(tmp_path)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)},
                                      "overrides": {"task": ["debug=smoke", "data.n_way=50,5"]}}})
    with pytest.raises(SystemExit) as exc:
        SweepSummary().on_multirun_end(cfg)
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert str(sweep / name) in out
    assert "job 0 failed: data.n_way=50" in out
    assert err.startswith("error: 1 of 3 sweep jobs did not finish (job 0: data.n_way=50")


def test_sweep_with_a_failing_job_finishes_the_others(cli, tmp_path):
    """The issue's case through the real CLI: 50-way episodes on the synthetic data's 64 training classes
    are fine, but its 16 validation classes are too few; known only once the data is loaded, so that job
    fails alone, the 5-way one runs, and the sweep ends with the summary and exit 1."""
    sweep = tmp_path / "sweep"
    p = cli("train", "-m", "debug=smoke", "algo=protonet", "backbone.hidden=8", "data.n_way=50,5",
            f"hydra.sweep.dir={sweep}")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert (sweep / "1" / "results.json").exists() and not (sweep / "0" / "results.json").exists()
    assert json.loads((sweep / "0" / FAILED_FILE).read_text())["exit_code"] == 2
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["data.n_way"], r["status"]) for r in rows] == [("50", "failed"), ("5", "done")]
    assert "n_way" in rows[0]["error"]
    assert "debug=smoke" in (sweep / "summary.md").read_text().splitlines()[0]
    assert str(sweep / "summary.png") in p.stdout
    assert p.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 sweep jobs did not finish (job 0:")


def test_compose_time_errors_still_refuse_the_whole_sweep_up_front(cli, tmp_path):
    """A typo'd key or a bad value in one combination is the user's input: refused before any job starts."""
    sweep = tmp_path / "sweep"
    p = cli("train", "-m", "debug=smoke", "data.n_wya=5,10", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 2 and "data.n_wya" in p.stderr
    assert not (sweep / "0").exists()
