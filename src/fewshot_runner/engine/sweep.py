"""Multirun sweeps: each job's failure recorded in its folder, and at the end a summary
(summary.csv, summary.md, summary.png) with one column per swept key; the sweep exits non-zero
when a job did not finish.

A job that fails (a UserError's one line, or any other exception) is recorded by the CLI's task
function with :func:`record_failure` (``<job dir>/failed.json``, plus ``error.log`` with the
traceback of an unexpected error) and the sweep goes on.  :class:`SweepSummary`, a Hydra callback,
writes and prints the summary when the last job is done, then raises ``SystemExit(1)`` if any job
failed.  Everything is read back from the job folders, so it works with any launcher.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

FAILED_FILE = "failed.json"
ERROR_LOG = "error.log"
RESULT_COLUMNS = ("status", "val/best_acc", "test/acc", "test/ci95", "wall_time_s", "error")
# a sweep of regression runs (results.json with test/mse, engine/evaluate.py): the MSE, lower is better
MSE_COLUMNS = ("status", "val/best_mse", "test/mse", "test/ci95", "wall_time_s", "error")


# ----------------------------------------------------------------------------- per job
def record_failure(job_dir: str | Path, message: str, exit_code: int = 1, detail: str | None = None) -> Path:
    """Write ``<job_dir>/failed.json`` (the one-line error and exit code) and, for an unexpected
    error, its traceback in ``error.log``; returns the json's path."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    rec = {"error": message, "exit_code": int(exit_code)}
    if detail:
        (job_dir / ERROR_LOG).write_text(detail, encoding="utf-8")
        rec["traceback"] = ERROR_LOG
    path = job_dir / FAILED_FILE
    path.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    return path


def clear_failure(job_dir: str | Path) -> None:
    """A rerun of the job (``resume=auto``) starts without the last attempt's failure record."""
    for name in (FAILED_FILE, ERROR_LOG):
        (Path(job_dir) / name).unlink(missing_ok=True)


def sweep_job_dir() -> Path | None:
    """This job's folder when it runs in a multirun (where a failure is recorded and the sweep goes
    on), else None. A stale failure record of an earlier attempt is removed."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        job_dir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - outside Hydra: a plain run
        return None
    clear_failure(job_dir)
    return job_dir


def job_failed(job_dir: Path, error: BaseException, message: str | None, exit_code: int = 1) -> None:
    """Record a failed sweep job and say so on stderr; the sweep goes on. ``message``: the error's one
    line (a UserError's text), or None for an unexpected error: then its type and first line, with
    the traceback kept in ``<job dir>/error.log``."""
    import traceback

    detail = None
    if message is None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = f"{type(error).__name__}: {first}" if first else type(error).__name__
        detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    record_failure(job_dir, message, exit_code, detail)
    where = f" (traceback in {job_dir / ERROR_LOG})" if detail else ""
    print(f"job {job_dir.name} failed: {message}{where}; the sweep goes on", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- reading back
def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder: ``job``, ``overrides`` (list), ``status`` (done, failed, interrupted),
    the results, and ``error`` (the one line of a failed job)."""
    rows = []
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for job_dir in jobs:
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides: list[str] = []
        if overrides_file.exists():
            overrides = [ln[2:].strip() for ln in overrides_file.read_text().splitlines() if ln.startswith("- ")]
            overrides = [o for o in overrides if not o.startswith("resume=")]  # how it ran, not what it is
        row: dict[str, Any] = {"job": int(job_dir.name), "overrides": overrides,
                               "val/best_acc": None, "test/acc": None, "test/ci95": None, "wall_time_s": None,
                               "error": ""}
        res, failed = job_dir / "results.json", job_dir / FAILED_FILE
        if res.exists():
            r = json.loads(res.read_text())
            row.update({k: r.get(k) for k in ("val/best_acc", "test/acc", "test/ci95", "wall_time_s")})
            row.update({k: r[k] for k in ("val/best_mse", "test/mse") if k in r})  # (regression runs)
            row["status"] = "done"
        elif failed.exists():
            row["status"] = "failed"
            try:
                row["error"] = str(json.loads(failed.read_text()).get("error", ""))
            except ValueError:
                row["error"] = "(failed.json is unreadable)"
        elif (job_dir / "checkpoints" / "last.pt").exists():
            row["status"] = "interrupted"
            row["error"] = "stopped before the end; rerun the sweep with resume=auto to go on"
        else:
            row["status"] = "failed"
            row["error"] = "stopped without results or an error message (killed?)"
        rows.append(row)
    return rows


def swept_and_constant(rows: list[dict[str, Any]], sweep_overrides: list[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The keys that vary between jobs (or are sweeps in the command line), in command-line order,
    and the keys every job shares with their value."""
    swept_cli: set[str] = set()
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        for o in OverridesParser.create().parse_overrides(list(sweep_overrides)):
            if o.is_sweep_override():
                swept_cli.add(o.key_or_group)
    except Exception:  # noqa: BLE001 - a summary must not fail on an override it cannot parse
        pass
    order: list[str] = []
    values: dict[str, set[str]] = {}
    for r in rows:
        for o in r["overrides"]:
            k, v = _split(o)
            if k not in values:
                order.append(k)
                values[k] = set()
            values[k].add(v)
    swept = [k for k in order
             if k in swept_cli or len(values[k]) > 1 or any(k not in dict(map(_split, r["overrides"])) for r in rows)]
    constant = {k: next(iter(values[k])) for k in order if k not in swept}
    return swept, constant


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _test_cell(r: dict[str, Any]) -> str:
    return "" if r["test/acc"] is None else f"{_pct(r['test/acc'])} ± {_pct(r['test/ci95'] or 0.0)}"


def summary_metric(rows: list[dict[str, Any]]) -> str:
    """``"mse"`` when the jobs are regression runs (their results hold test/mse), else ``"acc"``."""
    return "mse" if any(r.get("test/mse") is not None or r.get("val/best_mse") is not None for r in rows) else "acc"


def _score_cells(r: dict[str, Any], metric: str) -> tuple[str, str]:
    """(best validation, test) cells: accuracies in %, or MSEs as they are."""
    if metric == "acc":
        return _pct(r["val/best_acc"]), _test_cell(r)
    num = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    test = "" if r.get("test/mse") is None else f"{num(r['test/mse'])} ± {num(r['test/ci95'] or 0.0)}"
    return num(r.get("val/best_mse")), test


def _wall_cell(r: dict[str, Any]) -> str:
    return "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f}"


def _label(r: dict[str, Any], swept: list[str]) -> str:
    """``n_way=5, inner_lr=0.1``: the swept values (a key's last part where that is unambiguous)."""
    ov = dict(map(_split, r["overrides"]))
    last = [k.rsplit(".", 1)[-1] for k in swept]
    parts = [f"{short if last.count(short) == 1 else k}={ov.get(k, '')}" for k, short in zip(swept, last)]
    return ", ".join(parts) or f"job {r['job']}"


def _title(constant: dict[str, str]) -> str:
    return "sweep" + (": " + " ".join(f"{k}={v}" for k, v in constant.items()) if constant else "")


# ----------------------------------------------------------------------------- writing
@dataclass
class Summary:
    sweep_dir: Path
    rows: list[dict[str, Any]]
    swept: list[str]
    constant: dict[str, str]
    files: list[Path] = field(default_factory=list)
    metric: str = "acc"  # "mse": regression runs (summary_metric)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "done"]


def write_summary(sweep_dir: Path, sweep_overrides: list[str] = ()) -> Summary:
    """summary.csv (raw numbers: accuracies as fractions), summary.md (rounded, in %) and summary.png."""
    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir)
    swept, constant = swept_and_constant(rows, sweep_overrides)
    metric = summary_metric(rows)
    s = Summary(sweep_dir, rows, swept, constant, metric=metric)
    columns = RESULT_COLUMNS if metric == "acc" else MSE_COLUMNS

    csv_path = sweep_dir / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", *swept, *columns, "overrides"])
        for r in rows:
            ov = dict(map(_split, r["overrides"]))
            w.writerow([r["job"], *(ov.get(k, "") for k in swept),
                        *("" if r.get(c) is None else r[c] for c in columns), " ".join(r["overrides"])])

    md_path = sweep_dir / "summary.md"
    scores = ["best val acc (%)", "test acc (%)"] if metric == "acc" else ["best val mse", "test mse (lower is better)"]
    lines = [f"# {_title(constant)}", "", f"`{sweep_dir}`", "",
             "| job | " + " | ".join(swept + ["status", *scores, "wall time (s)"]) + " |",
             "|---" * (len(swept) + 5) + "|"]
    for r in rows:
        ov = dict(map(_split, r["overrides"]))
        cells = [str(r["job"]), *(ov.get(k, "") for k in swept), r["status"], *_score_cells(r, metric),
                 _wall_cell(r)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if s.failed:
        lines += ["", "## Jobs that did not finish", ""]
        lines += [f"- job {r['job']} ({' '.join(r['overrides']) or 'no overrides'}): {r['status']}: {r['error']}"
                  for r in s.failed]
    md_path.write_text("\n".join(lines) + "\n")
    s.files = [csv_path, md_path]

    png_path = sweep_dir / "summary.png"
    if metric != "acc":  # (plots.save_sweep_summary_plot draws test accuracies only)
        print("summary.png not drawn: the summary plot shows test accuracies and these are regression runs "
              "(test mse: summary.md and summary.csv)", file=sys.stderr)
        return s
    try:
        from fewshot_runner.plots import save_sweep_summary_plot

        drawn = save_sweep_summary_plot([dict(r, job=_label(r, swept)) for r in rows], png_path, title=_title(constant))
        if drawn is not None:
            s.files.append(png_path)
    except Exception as e:  # noqa: BLE001 - a plot must never fail a finished sweep
        print(f"warning: could not draw summary.png ({e})", file=sys.stderr)
    return s


def print_summary(s: Summary) -> None:
    from rich.console import Console
    from rich.table import Table

    from rich import box

    table = Table(title=_title(s.constant), caption=str(s.sweep_dir), box=box.SIMPLE_HEAD)
    table.add_column("job", justify="right", no_wrap=True)
    last = [k.rsplit(".", 1)[-1] for k in s.swept]
    for k, short in zip(s.swept, last):  # a key's last part where unambiguous: the md and csv have it whole
        table.add_column(short if last.count(short) == 1 else k, overflow="fold")
    table.add_column("status", no_wrap=True)
    scores = ("best val (%)", "test (%)") if s.metric == "acc" else ("best val mse", "test mse (lower is better)")
    for c in (*scores, "time (s)"):
        table.add_column(c, justify="right", no_wrap=True)
    for r in s.rows:
        ov = dict(map(_split, r["overrides"]))
        table.add_row(str(r["job"]), *(ov.get(k, "") for k in s.swept),
                      r["status"] if r["status"] == "done" else f"[red]{r['status']}[/red]",
                      *_score_cells(r, s.metric), _wall_cell(r))
    console = Console(highlight=False)
    console.print(table)
    for r in s.failed:
        console.print(f"job {r['job']} {r['status']}: {r['error']}", markup=False, soft_wrap=True)
    console.print("sweep summary files:", markup=False)
    for p in s.files:
        console.print(f"  {p}", markup=False, soft_wrap=True)


class SweepSummary(Callback):
    """``hydra.callbacks`` entry of conf/train.yaml: the summary at the end of a multirun."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        try:
            task = list(config.hydra.overrides.task)
        except Exception:  # noqa: BLE001
            task = []
        s = write_summary(sweep_dir, task)
        print_summary(s)
        if s.failed:
            first = s.failed[0]
            print(f"error: {len(s.failed)} of {len(s.rows)} sweep jobs did not finish (job {first['job']}: "
                  f"{first['error']}); see {sweep_dir / 'summary.md'}", file=sys.stderr, flush=True)
            raise SystemExit(1)  # a BaseException: Hydra's callback runner passes it on, so the exit code is 1
