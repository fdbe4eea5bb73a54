"""Training curves and sweep summary plots (matplotlib Agg, imported lazily)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["read_metrics", "save_curves", "save_sweep_summary_plot"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(metrics_jsonl: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; torn or non-object lines are skipped."""
    path = Path(metrics_jsonl)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            out.append(rec)
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    by_step: dict[float, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[r["step"]] = float(v)  # a later line for the same step wins
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def save_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Plot train/loss (left panel) and train/acc + val/acc (right panel) against step.
    Returns the PNG path, or None when metrics.jsonl has none of these series."""
    records = read_metrics(metrics_jsonl)
    loss = _series(records, "train/loss")
    tr_acc = _series(records, "train/acc")
    val_acc = _series(records, "val/acc")
    if not (loss[0] or tr_acc[0] or val_acc[0]):
        return None

    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        if loss[0]:
            ax_loss.plot(*loss, label="train/loss", color="tab:red")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.set_title("training loss")
        ax_loss.grid(alpha=0.3)
        if tr_acc[0]:
            ax_acc.plot(*tr_acc, label="train/acc", color="tab:blue")
        if val_acc[0]:
            ax_acc.plot(*val_acc, label="val/acc", color="tab:green", marker="o", markersize=3)
        ax_acc.set_xlabel("step")
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_title("accuracy")
        ax_acc.grid(alpha=0.3)
        for ax in (ax_loss, ax_acc):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
        fig.tight_layout()
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


def save_sweep_summary_plot(rows: list[dict[str, Any]], out_png: str | Path, title: str | None = None) -> Path | None:
    """Bar chart of ``test/acc`` (in %) with ``test/ci95`` error bars, one bar per row, labelled by
    ``job`` (wrapped to fit). A row without a numeric test/acc is drawn as its ``status`` in red
    when it has one (a failed job), else skipped; returns None when no row is left. ``title``
    (the constant overrides) is wrapped above the chart. Value labels sit inside long bars and
    beside short ones, so none is cut at the 100 % edge."""
    import textwrap

    data = []  # (label, acc %, ci %, or None and a status)
    for r in rows:
        label = textwrap.fill(str(r.get("job", len(data))), width=38, break_long_words=True)
        acc = r.get("test/acc")
        if isinstance(acc, (int, float)) and math.isfinite(acc):
            ci = r.get("test/ci95")
            ci = float(ci) if isinstance(ci, (int, float)) and math.isfinite(ci) else 0.0
            data.append((label, 100.0 * float(acc), 100.0 * ci, ""))
        elif r.get("status") and r.get("status") != "done":
            data.append((label, None, 0.0, str(r["status"])))
    if not data:
        return None

    plt = _pyplot()
    title_text = textwrap.fill(title or "sweep summary", width=90)
    n_label_lines = sum(d[0].count("\n") + 1 for d in data)
    height = 1.2 + 0.25 * max(n_label_lines, len(data)) + 0.18 * (title_text.count("\n") + 1)
    fig, ax = plt.subplots(figsize=(10, max(2.5, height)))
    try:
        y = list(range(len(data)))
        done = [(yi, d) for yi, d in zip(y, data) if d[1] is not None]
        if done:
            ax.barh([yi for yi, _ in done], [d[1] for _, d in done], xerr=[d[2] for _, d in done], capsize=4,
                    color="tab:blue", alpha=0.8)
        for yi, (_, acc, ci, status) in zip(y, data):
            if acc is None:
                ax.text(1, yi, status, va="center", ha="left", fontsize=8, color="tab:red", fontweight="bold")
            elif acc - ci > 30:
                ax.text(acc - ci - 1, yi, f"{acc:.2f} ± {ci:.2f}", va="center", ha="right", fontsize=8, color="white")
            else:
                ax.text(acc + ci + 1, yi, f"{acc:.2f} ± {ci:.2f}", va="center", ha="left", fontsize=8)
        ax.set_yticks(y)
        ax.set_yticklabels([d[0] for d in data], fontsize=8)
        ax.set_ylim(len(data) - 0.5, -0.5)
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy (%) ± 95% CI")
        ax.set_title(title_text, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out
