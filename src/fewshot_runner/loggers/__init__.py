"""Run loggers: ``metrics.jsonl`` always, plus Comet (online, or its offline archive) and/or
TensorBoard.

``logger.kind`` names one writer or several joined by ``+``:

* ``auto``: Comet online if ``COMET_API_KEY`` is set, else Comet's offline archive
* ``comet``: online, falling back to the offline archive when it cannot connect
* ``comet_offline``: the archive in ``<run dir>/comet`` (``comet upload <zip>`` later)
* ``tensorboard``: event files in ``<run dir>/tensorboard`` (needs ``pip install tensorboard``)
* ``none``: ``metrics.jsonl`` only
* e.g. ``comet_offline+tensorboard``: both (``+``, not ``,``: a comma makes a Hydra sweep)

The engine builds its logger with :func:`make_run_logger` (name, tags and run info from the config),
or :func:`make_logger` for a bare one.  This package stays importable without torch and imports
comet_ml and tensorboard lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

from fewshot_runner.loggers.base import MultiLogger, NullLogger, RunLogger, flatten
from fewshot_runner.loggers.comet import COMET_KWARGS as _COMET_KWARGS  # noqa: F401  (tests adjust it)
from fewshot_runner.loggers.comet import CometLogger
from fewshot_runner.loggers.comet_connect import api_key
from fewshot_runner.loggers.jsonl import JSONLLogger
from fewshot_runner.loggers.runinfo import collect_run_info, run_identity
from fewshot_runner.loggers.tensorboard import TensorBoardLogger, tensorboard_missing

__all__ = ["RunLogger", "NullLogger", "JSONLLogger", "CometLogger", "TensorBoardLogger", "MultiLogger",
           "make_logger", "make_run_logger", "parse_kinds", "check_kind", "describe_kind", "flatten",
           "collect_run_info", "run_identity", "KINDS"]

_log = logging.getLogger(__name__)

KINDS = ("auto", "comet", "comet_offline", "tensorboard", "none")
_COMET_KINDS = ("auto", "comet", "comet_offline")


def parse_kinds(kind: str | Iterable[str]) -> list[str]:
    """``"comet_offline+tensorboard"`` (or a list) -> ``["comet_offline", "tensorboard"]``; a ValueError
    with one line naming the fix for an unknown kind, two Comet kinds, or ``none`` with another."""
    parts = kind.split("+") if isinstance(kind, str) else [str(k) for k in kind]
    parts = [p.strip() for p in parts if p.strip()]
    shown = "+".join(parts) if parts else str(kind)
    unknown = [p for p in parts if p not in KINDS]
    if unknown or not parts:
        raise ValueError(f"logger.kind={shown}: unknown logger kind {unknown[0] if unknown else '(empty)'!r}; "
                         f"choose one of {', '.join(KINDS)}, or several joined by + "
                         f"(e.g. logger.kind=comet_offline+tensorboard)")
    if "none" in parts and len(parts) > 1:
        raise ValueError(f"logger.kind={shown}: 'none' cannot be combined with another logger; drop it")
    if sum(p in _COMET_KINDS for p in parts) > 1:
        raise ValueError(f"logger.kind={shown}: choose one of {', '.join(_COMET_KINDS)} (one Comet experiment "
                         f"per run)")
    return list(dict.fromkeys(parts))


def check_kind(kind: str | Iterable[str]) -> str | None:
    """For the CLI's preflight: the one-line reason ``logger.kind`` cannot run here, or None. Cheap (no
    comet_ml or tensorboard import)."""
    try:
        parts = parse_kinds(kind)
    except ValueError as e:
        return str(e)
    if "tensorboard" in parts:
        return tensorboard_missing()
    return None


def describe_kind(kind: str | Iterable[str], run_dir: str | Path) -> str:
    """Where ``kind`` will write, without building it (no comet_ml import): for a banner printed before
    the logger exists. ``MultiLogger.describe()`` says the same once it is built (with the Comet URL)."""
    run_dir = Path(run_dir)
    try:
        kinds = parse_kinds(kind)
    except ValueError:
        return str(kind)
    parts = [str(run_dir / "metrics.jsonl")]
    for k in kinds:
        if k in _COMET_KINDS:
            online = k == "comet" or (k == "auto" and api_key())
            parts.append("Comet online (offline archive in " + str(run_dir / "comet") + " if it cannot connect)"
                         if online else f"Comet offline archive in {run_dir / 'comet'}")
        elif k == "tensorboard":
            parts.append(f"TensorBoard events in {run_dir / 'tensorboard'}")
    return "; ".join(parts)


def make_logger(
    kind: str | Iterable[str],
    run_dir: str | Path,
    *,
    project_name: str | None = None,
    workspace: str | None = None,
    experiment_name: str | None = None,
    tags: Iterable[str] = (),
    console: Any = None,
    truncate_after_step: int | None = None,
    log_model: bool = False,
) -> MultiLogger:
    """``run_dir/metrics.jsonl`` plus the writers of ``kind`` (see the package docstring).
    ``console`` (a rich Console or anything with ``print``) shows notices at once. ``log_model``:
    whether ``log_model()`` uploads the checkpoint to Comet. A missing tensorboard package is a
    UserError naming the ``pip install``; a missing comet_ml a notice (metrics.jsonl goes on)."""
    kinds = parse_kinds(kind)
    run_dir = Path(run_dir)
    tags = [str(t) for t in tags]
    if "tensorboard" in kinds:  # before anything is written: a refusal leaves no file behind
        missing = tensorboard_missing()
        if missing:
            from fewshot_runner.errors import UserError

            raise UserError(missing)
    loggers: list[RunLogger] = [JSONLLogger(run_dir / "metrics.jsonl", truncate_after_step=truncate_after_step)]

    def notify(msg: str) -> None:
        if console is not None:
            try:
                console.print(msg, markup=False, highlight=False)
            except TypeError:
                console.print(msg)
        else:
            _log.warning("%s", msg)

    comet = [k for k in kinds if k in _COMET_KINDS]
    if comet:
        mode = "offline" if comet[0] == "comet_offline" or (comet[0] == "auto" and not api_key()) else "online"
        try:
            loggers.append(CometLogger(mode, run_dir, project_name=project_name, workspace=workspace,
                                       experiment_name=experiment_name, tags=tags, notify=notify,
                                       log_model=log_model))
        except ImportError as e:
            notify(f"comet_ml is not importable ({e}); logging to {run_dir / 'metrics.jsonl'} only")
    if "tensorboard" in kinds:
        loggers.append(TensorBoardLogger(run_dir, truncate_after_step=truncate_after_step,
                                         experiment_name=experiment_name, tags=tags))
    return MultiLogger(*loggers)


def make_run_logger(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    *,
    truncate_after_step: int | None = None,
    job: str = "train",
    described: Mapping[str, Any] | None = None,
    console: Any = None,
) -> MultiLogger:
    """The run's loggers from its config: ``cfg.logger`` (kind, project_name, workspace,
    experiment_name, tags, log_model); the default experiment name and the tags from
    :func:`run_identity` of ``described`` (the run's own config; for ``fewshot eval``, the checkpoint's
    training config, with ``job="eval"``); the run info (:func:`collect_run_info`) logged at once."""
    lc = cfg.get("logger") or {}
    name, tags = run_identity(described if described is not None else cfg, job=job)
    logger = make_logger(
        lc.get("kind", "none"), run_dir, project_name=lc.get("project_name"), workspace=lc.get("workspace"),
        experiment_name=lc.get("experiment_name") or name, tags=[*tags, *(lc.get("tags") or [])],
        console=console, truncate_after_step=truncate_after_step, log_model=bool(lc.get("log_model", False)))
    logger.set_run_info(collect_run_info(run_dir))
    return logger
