"""Rich console output: the training progress (a calm bar in a terminal, plain status lines
elsewhere), the results table, one-line messages.

The training loop uses :func:`training_progress`::

    with training_progress(cfg.train.steps, start=step, enabled=cfg.train.progress) as progress:
        while step < cfg.train.steps:
            ...
            progress.update(step, {"loss": 0.41, "acc": 0.873}, lr=1e-3, best_val=0.912)

Speed and ETA are measured over the last ~30 s (:class:`RateWindow`), not rich's short window, so
the ETA does not jump; accuracies are shown in % like validation's.
"""

from __future__ import annotations

import datetime as _dt

import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

console = Console(stderr=False, highlight=False)

RATE_WINDOW_S = 30.0  # speed and ETA over this many seconds
STATUS_EVERY_S = 30.0  # plain status lines (no bar drawn): at most one per this many seconds
ESTIMATE_AFTER_S = 10.0  # the whole run's estimated wall time: printed once, after this long and
ESTIMATE_AFTER_STEPS = 5  # this many steps


class RateWindow:
    """Steps per second over the last ``window_s`` seconds of ``add(step, t)`` samples (all of them
    until that much time has passed). The first sample only starts the clock, so a slow first step
    (compilation, warm-up) does not count."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, step: int, t: float | None = None) -> None:
        t = time.monotonic() if t is None else t
        self._samples.append((t, step))
        # keep one sample at or before the window's start, so the rate spans the whole window
        while len(self._samples) > 2 and self._samples[1][0] <= t - self.window_s:
            self._samples.popleft()

    @property
    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def eta(self, step: int, total: int) -> float | None:
        r = self.rate
        return None if not r else max(0, total - step) / r


def clock(seconds: float | None) -> str:
    """H:MM:SS, or ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def speed_text(rate: float | None) -> str:
    if not rate:
        return "? steps/s"
    return f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.2f} s/step"


def _metric(metrics: Mapping[str, Any], name: str) -> float | None:
    for k in (f"train/{name}", name):
        v = metrics.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            return float(v)
    return None


def metrics_text(metrics: Mapping[str, Any] | None = None, lr: float | None = None,
                 best_val: float | None = None, best_val_name: str = "acc") -> str:
    """``loss 0.412  acc 87.30 %  lr 1.0e-03  best val 91.20 %``: labelled, accuracies in %.  Regression
    (``best_val_name="mse"``): ``loss 0.412  mse 0.4120  lr 1.0e-03  best val mse 0.3810``."""
    metrics = metrics or {}
    parts = []
    loss, acc, mse = _metric(metrics, "loss"), _metric(metrics, "acc"), _metric(metrics, "mse")
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if acc is not None:
        parts.append(f"acc {100 * acc:.2f} %")
    if mse is not None:
        parts.append(f"mse {mse:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if best_val_name == "acc" and best_val is not None and best_val >= 0:
        parts.append(f"best val {100 * best_val:.2f} %")
    elif best_val_name != "acc" and best_val is not None and best_val < float("inf"):
        parts.append(f"best val {best_val_name} {best_val:.4f}")
    return "  ".join(parts)


class _TwoLineProgress(Progress):
    """The bar with step, speed, elapsed and ETA on one line; the metrics on the line below."""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            detail = task.fields.get("detail")
            if detail:
                yield Text("      " + detail)


class TrainProgress:
    """What :func:`training_progress` yields; :meth:`update` after each logged step."""

    def __init__(self, total: int, start: int, bar: Progress | None, elapsed_before: float = 0.0,
                 status_every_s: float = STATUS_EVERY_S, estimate: bool = True):
        self.total, self.start = int(total), int(start)
        self.step = int(start)
        self._bar = bar
        self._task = bar.add_task("train", total=self.total, completed=self.start, detail="", rate="",
                                  elapsed="", eta="") if bar is not None else None
        self.window = RateWindow()
        self._t0 = time.monotonic()
        self._elapsed_before = elapsed_before
        self._status_every_s = status_every_s
        self._said = self._t0
        self._first: tuple[float, int] | None = None
        self._estimated = not estimate
        self.line = ""  # the last status text, for tests and for the lead's own use

    @property
    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._t0

    @property
    def eta_s(self) -> float | None:
        return self.window.eta(self.step, self.total)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None, lr: float | None = None,
               best_val: float | None = None, best_val_name: str = "acc") -> None:
        """``metrics``: ``loss``/``acc`` (or ``train/loss``/``train/acc``; acc a fraction); ``lr`` the
        learning rate; ``best_val`` the best validation accuracy so far (a fraction; None or < 0: none yet),
        or with ``best_val_name="mse"`` the lowest validation MSE (inf: none yet)."""
        now = time.monotonic()
        self.step = int(step)
        self.window.add(self.step, now)
        if self._first is None:
            self._first = (now, self.step)
        detail = metrics_text(metrics, lr, best_val, best_val_name)
        rate, eta = self.window.rate, self.eta_s
        parts = [f"step {self.step}/{self.total}", detail, speed_text(rate), f"elapsed {clock(self.elapsed)}",
                 f"ETA {clock(eta)}"]
        self.line = "  ".join(p for p in parts if p)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.step, detail=detail, rate=speed_text(rate),
                             elapsed=clock(self.elapsed), eta=clock(eta))
        elif now - self._said >= self._status_every_s or self.step >= self.total:
            console.print(self.line, markup=False, highlight=False, soft_wrap=True)
            self._said = now
        self._maybe_estimate(now)

    def _maybe_estimate(self, now: float) -> None:
        if self._estimated or self._first is None:
            return
        t_first, s_first = self._first
        steps, seconds = self.step - s_first, now - t_first
        if self.step >= self.total:
            self._estimated = True
            return
        if steps >= ESTIMATE_AFTER_STEPS and seconds >= ESTIMATE_AFTER_S:
            self._estimated = True
            print_estimate(steps, self.total, seconds, step_now=self.step, elapsed=self.elapsed)


def estimate_text(steps_done: int, total: int, seconds: float, step_now: int | None = None,
                  elapsed: float | None = None, now: _dt.datetime | None = None) -> str:
    """``estimated wall time: 1:12:05 for 10,000 steps (0.43 s/step over the first 20; ...), ends around
    21:26``. ``steps_done`` steps took ``seconds``; ``total``: the run's steps; ``step_now``: the step
    reached (default ``steps_done``); ``elapsed``: the run's wall time so far (default ``seconds``)."""
    if steps_done <= 0 or seconds <= 0:
        return "estimated wall time: unknown yet"
    per_step = seconds / steps_done
    step_now = steps_done if step_now is None else step_now
    left = max(0, total - step_now) * per_step
    whole = (seconds if elapsed is None else elapsed) + left
    now = now or _dt.datetime.now()
    end = now + _dt.timedelta(seconds=left)
    return (f"estimated wall time: {clock(whole)} for {total:,} steps ({per_step:.3g} s/step over the first "
            f"{steps_done}; validation and the final test come on top), ends around {end:%H:%M}"
            + (f" on {end:%Y-%m-%d}" if end.date() != now.date() else ""))


def print_estimate(steps_done: int, total: int, seconds: float, step_now: int | None = None,
                   elapsed: float | None = None) -> None:
    """One line: the whole run's estimated wall time (see :func:`estimate_text`)."""
    console.print(estimate_text(steps_done, total, seconds, step_now, elapsed), markup=False, highlight=False,
                  soft_wrap=True)



def _bar(enabled: bool) -> Progress | None:
    if not (enabled and console.is_terminal):
        return None
    return _TwoLineProgress(
        TextColumn("[bold]train"), BarColumn(bar_width=28), TextColumn("step"), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("elapsed {task.fields[elapsed]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=console, refresh_per_second=2, transient=False,
    )


@contextmanager
def training_progress(total: int, start: int = 0, enabled: bool = True, elapsed_before: float = 0.0,
                      estimate: bool = True, status_every_s: float = STATUS_EVERY_S) -> Iterator[TrainProgress]:
    """The progress of a training run from step ``start`` to ``total``. In a terminal with ``enabled``
    (``train.progress``): a bar, redrawn twice a second. Otherwise (a pipe, a SLURM log,
    ``train.progress=false``): a plain status line at most every 30 s and at the last step.
    ``elapsed_before``: seconds a resumed run had already trained. ``estimate``: print the whole run's
    estimated wall time once, after the first few steps (:func:`print_estimate`)."""
    bar = _bar(enabled)
    if bar is None:
        yield TrainProgress(total, start, None, elapsed_before, status_every_s, estimate=estimate)
        return
    with bar:
        yield TrainProgress(total, start, bar, elapsed_before, status_every_s, estimate=estimate)


def results_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    return table


def info(msg: str) -> None:
    console.print(msg)
