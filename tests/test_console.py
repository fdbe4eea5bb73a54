"""The start-of-run banner, the estimate, the config tree and the calm progress bar."""

from __future__ import annotations

import datetime as dt
import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from fewshot_runner.engine import banner, console as con
from fewshot_runner.engine.console import RateWindow, metrics_text, training_progress


@pytest.fixture
def screen(monkeypatch):
    """The package's console, writing to a buffer; ``terminal`` decides whether the bar is drawn."""

    def make(terminal: bool) -> io.StringIO:
        buf = io.StringIO()
        c = Console(file=buf, force_terminal=terminal, width=140, highlight=False, color_system=None)
        monkeypatch.setattr(con, "console", c)
        monkeypatch.setattr(banner, "console", c)
        return buf

    return make


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(con.time, "monotonic", c)
    return c


# ----------------------------------------------------------------------------- progress
def test_speed_is_smoothed_over_30_seconds_and_ignores_the_first_step():
    w = RateWindow(30.0)
    w.add(1, 100.0)  # after a slow first step (warm-up): only starts the clock
    assert w.rate is None and w.eta(1, 100) is None
    for i in range(2, 12):  # 1 step/s for 10 s
        w.add(i, 100.0 + i - 1)
    assert w.rate == pytest.approx(1.0)
    w.add(12, 110.1)  # one fast step barely moves it (rich's window would jump)
    assert w.rate == pytest.approx(11 / 10.1)
    for i in range(13, 100):  # then 2 steps/s for 43.5 s: the window forgets the old rate after ~30 s
        w.add(i, 110.1 + (i - 12) / 2)
    assert w.rate == pytest.approx(2.0, rel=0.02)
    assert w.eta(99, 199) == pytest.approx(50.0, rel=0.02)


def test_metrics_are_labelled_and_accuracy_is_in_percent():
    text = metrics_text({"train/loss": 0.41234, "train/acc": 0.873, "train/lr": 1e-3}, lr=1e-3, best_val=0.912)
    assert text == "loss 0.412  acc 87.30 %  lr 1.0e-03  best val 91.20 %"
    assert metrics_text({"loss": 1.0}, best_val=-1.0) == "loss 1.000"  # no validation yet


def test_plain_status_lines_away_from_a_terminal(screen, clock):
    out = screen(terminal=False)
    with training_progress(100, enabled=True, estimate=False) as p:
        for step in range(1, 101):
            clock.t += 0.5
            p.update(step, {"loss": 0.5, "acc": 0.9}, lr=1e-3, best_val=0.95 if step > 50 else None)
    lines = out.getvalue().splitlines()
    # one line per 30 s (every 60 steps at 2 steps/s) and the last step; no bar characters
    assert [ln.split()[1] for ln in lines] == ["60/100", "100/100"]
    assert lines[-1] == ("step 100/100  loss 0.500  acc 90.00 %  lr 1.0e-03  best val 95.00 %  2.00 steps/s  "
                         "elapsed 0:00:50  ETA 0:00:00")
    assert "━" not in out.getvalue()


def test_the_bar_in_a_terminal_even_for_a_smoke_preset(screen, clock):
    out = screen(terminal=True)
    with training_progress(4, enabled=True, estimate=False) as p:
        for step in range(1, 5):
            clock.t += 2.0
            p.update(step, {"loss": 1.5, "acc": 0.25}, lr=0.001)
    text = out.getvalue()
    assert "step" in text and "4/4" in text and "2.00 s/step" in text and "ETA 0:00:00" in text
    assert "acc 25.00 %" in text and "lr 1.0e-03" in text


def test_progress_false_hides_the_bar(screen, clock):
    out = screen(terminal=True)
    with training_progress(4, enabled=False, estimate=False) as p:
        for step in range(1, 5):
            clock.t += 1.0
            p.update(step, {"loss": 1.5})
    assert "━" not in out.getvalue() and out.getvalue().startswith("step 4/4")


def test_the_estimate_is_printed_once_after_the_first_steps(screen, clock):
    out = screen(terminal=False)
    with training_progress(1000, enabled=False) as p:
        for step in range(1, 30):
            clock.t += 0.5 if step > 1 else 20.0  # a slow first step is not counted
            p.update(step, {"loss": 1.0})
    est = [ln for ln in out.getvalue().splitlines() if ln.startswith("estimated wall time")]
    assert len(est) == 1
    assert "for 1,000 steps (0.5 s/step over the first" in est[0]


def test_estimate_text_names_the_whole_run_and_its_end():
    now = dt.datetime(2026, 12, 5, 20, 0)
    text = banner.estimate_text(20, 10_000, 8.0, now=now)
    assert text.startswith("estimated wall time: 1:06:40 for 10,000 steps (0.4 s/step over the first 20")
    assert text.endswith("ends around 21:06")
    assert banner.estimate_text(0, 10, 0.0) == "estimated wall time: unknown yet"


# ----------------------------------------------------------------------------- banner and config tree
def test_banner_names_what_runs_where_and_what_auto_chose(compose_cfg, screen):
    out = screen(terminal=False)
    cfg = compose_cfg(["algo=maml", "data=synthetic", "device=cpu", "logger=comet_offline"])
    runtime = SimpleNamespace(device="cpu", precision="bf16", precision_note="bf16: the CPU has AMX",
                              channels_last=True, task_threads=2, compile=False, cuda_graphs=False, memory_cap_mb=None)
    banner.print_banner(cfg, "/runs/x", runtime, n_params=112_005,
                        logger_where="metrics.jsonl; Comet offline archive in /runs/x/comet",
                        choices={"algo": "maml", "data": "synthetic", "debug": "smoke"},
                        auto={"fused ops": "on", "task execution": "grouped convolutions"})
    text = out.getvalue()
    assert text.splitlines()[0] == "fewshot train: maml-synthetic-5w1s-seed0"
    for needle in ("MAML (algo=maml)", "inner_lr=0.4", "Synthetic (data=synthetic)", "val/test 5-way 1-shot",
                   "112,005 parameters", "precision bf16 (auto: bf16: the CPU has AMX)", "channels_last",
                   "2 task threads", "fused ops", "grouped convolutions", "/runs/x",
                   "comet_offline: metrics.jsonl; Comet offline archive in /runs/x/comet", "debug=smoke"):
        assert needle in text, needle


def test_config_tree_shows_groups_with_their_choice_and_resolved_values(compose_cfg, screen):
    out = screen(terminal=False)
    cfg = compose_cfg(["algo=maml", "debug=smoke"])
    banner.print_config_tree(cfg, choices={"algo": "maml"})
    text = out.getvalue()
    assert "algo (maml)" in text and "inner_lr: 0.4" in text
    assert "${" not in text  # interpolations resolved
    assert "compile: false" in text
