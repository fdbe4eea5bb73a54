"""Hydra callback: a summary table of a multirun sweep (summary.csv, summary.md, summary.png)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_file.exists():
            overrides = [ln[2:].strip() for ln in overrides_file.read_text().splitlines() if ln.startswith("- ")]
            overrides = [o for o in overrides if not o.startswith("resume=")]  # how it ran, not what it is
        row: dict[str, Any] = {"job": int(job_dir.name), "overrides": " ".join(overrides)}
        res = job_dir / "results.json"
        if res.exists():
            r = json.loads(res.read_text())
            row.update({"val/best_acc": r.get("val/best_acc"), "test/acc": r.get("test/acc"),
                        "test/ci95": r.get("test/ci95"), "wall_time_s": r.get("wall_time_s"), "status": "done"})
        else:
            row.update({"val/best_acc": None, "test/acc": None, "test/ci95": None, "wall_time_s": None,
                        "status": "interrupted" if (job_dir / "checkpoints" / "last.pt").exists() else "failed"})
        rows.append(row)
    return rows


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = collect_rows(sweep_dir)
    cols = ["job", "overrides", "val/best_acc", "test/acc", "test/ci95", "wall_time_s", "status"]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = ["| job | overrides | best val acc (%) | test acc (%) | wall time (s) | status |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        test = "" if r["test/acc"] is None else f"{_pct(r['test/acc'])} ± {_pct(r['test/ci95'])}"
        wall = "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f}"
        lines.append(f"| {r['job']} | {r['overrides']} | {_pct(r['val/best_acc'])} | {test} | {wall} | {r['status']} |")
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        from fewshot_runner.plots import save_sweep_summary_plot

        save_sweep_summary_plot([dict(r, job=f"{r['job']}: {r['overrides']}") for r in rows if r["test/acc"] is not None],
                                sweep_dir / "summary.png")
    except Exception as e:  # a plot must never fail a finished sweep
        print(f"warning: could not draw summary.png ({e})")
    return rows


def print_summary(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep summary: {sweep_dir}")
    for c in ("job", "overrides", "best val acc", "test acc", "wall time", "status"):
        table.add_column(c)
    for r in rows:
        test = "" if r["test/acc"] is None else f"{_pct(r['test/acc'])} % ± {_pct(r['test/ci95'])}"
        wall = "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f} s"
        table.add_row(str(r["job"]), r["overrides"], _pct(r["val/best_acc"]), test, wall, r["status"])
    Console().print(table)
    print(f"summary written to {sweep_dir / 'summary.csv'} and {sweep_dir / 'summary.md'}")


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        print_summary(write_summary(sweep_dir), sweep_dir)
