"""What a run says at its start: the banner (what runs, where, on what), the estimated wall time
after the first steps, and the resolved config as a tree.

* :func:`print_banner`: algorithm, data and episode shape, backbone and parameter count, device and
  what ``auto`` chose (precision, fused ops, task execution...), steps, run dir, logger and where it
  writes.  Call it as soon as the model and runtime are built, before the first step.
* :func:`print_estimate` (in engine/console.py, re-exported): the whole run's wall time from the first
  steps' speed (:func:`~fewshot_runner.engine.console.training_progress` calls it once by itself).
* :func:`print_config_tree`: the resolved config as a rich tree, each group with the option chosen.

Two ways to see a config without running (documented for users):

* ``fewshot train algo=maml data=omniglot --cfg job``: Hydra prints the composed config as YAML
  (interpolations such as ``${device.fused_ops}`` unresolved; add ``--resolve`` to resolve them)
  and exits; ``--cfg all`` adds Hydra's own settings, ``--package algo`` only one group.
* :func:`print_config_tree` for a ``print_config``-style tree with the group choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from fewshot_runner.engine.console import clock, console, estimate_text, print_estimate  # noqa: F401  (re-exported)

_SKIP_KEYS = ("_target_",)


def _name(node: Mapping[str, Any] | None) -> str:
    return str((node or {}).get("_target_", "?")).rsplit(".", 1)[-1]


def _choices() -> dict[str, str]:
    from fewshot_runner.loggers.runinfo import hydra_choices

    return hydra_choices()


def _settings(node: Mapping[str, Any] | None, skip: tuple[str, ...] = ()) -> str:
    """``inner_lr=0.4 inner_steps=1``: a group's scalar settings, ``_target_`` and ``skip`` left out."""
    out = []
    for k, v in (node or {}).items():
        if k in _SKIP_KEYS or k in skip or isinstance(v, Mapping):
            continue
        out.append(f"{k}={_yaml_scalar(v)}")
    return " ".join(out)


def _shape(data: Mapping[str, Any]) -> tuple[str, str]:
    test = f"{data.get('n_way')}-way {data.get('n_shot')}-shot {data.get('n_query')}-query"
    train = (f"{data.get('train_n_way') or data.get('n_way')}-way {data.get('train_n_shot') or data.get('n_shot')}-shot "
             f"{data.get('train_n_query') or data.get('n_query')}-query")
    return train, test


def _runtime_text(cfg: Mapping[str, Any], runtime: Any) -> str:
    """``cpu (device=auto), precision fp32 (auto: ...), channels_last, 2 task threads``."""
    dev = cfg.get("device") or {}
    if runtime is None:
        return f"device={dev.get('type', '?')} precision={dev.get('precision', '?')}"
    parts = [f"{getattr(runtime, 'device', '?')}" + (" (device=auto)" if dev.get("type") == "auto" else "")]
    precision = getattr(runtime, "precision", None) or dev.get("precision")
    note = getattr(runtime, "precision_note", "")
    parts.append(f"precision {precision}" + (f" (auto: {note})" if note else " (auto)" if dev.get("precision") == "auto"
                                             else ""))
    if getattr(runtime, "channels_last", False):
        parts.append("channels_last")
    threads = getattr(runtime, "task_threads", 1)
    if threads and threads > 1:
        parts.append(f"{threads} task threads")
    if getattr(runtime, "compile", False):
        parts.append("torch.compile")
    if getattr(runtime, "cuda_graphs", False):
        parts.append("CUDA graphs")
    cap = getattr(runtime, "memory_cap_mb", None)
    if cap:
        parts.append(f"memory cap {cap:g} MiB")
    return ", ".join(parts)


def banner_rows(cfg: Mapping[str, Any], run_dir: str | Path, runtime: Any = None, n_params: int | None = None,
                logger_where: str | None = None, choices: Mapping[str, str] | None = None,
                auto: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """The banner's (label, text) rows; see :func:`print_banner`."""
    groups = _choices() if choices is None else dict(choices)
    data, algo, backbone = cfg.get("data") or {}, cfg.get("algo") or {}, cfg.get("backbone") or {}
    train_cfg, eval_cfg = cfg.get("train") or {}, cfg.get("eval") or {}
    dev = cfg.get("device") or {}

    def label(group: str, node: Mapping[str, Any]) -> str:
        cls = _name(node)
        return f"{cls} ({group}={groups[group]})" if groups.get(group) else cls

    rows = [("algorithm", f"{label('algo', algo)}  {_settings(algo, skip=tuple(dev.keys()))}".rstrip())]
    where = data.get("root")
    rows.append(("data", f"{label('data', data)}" + (f"  root={where}" if where else "")
                 + (f"  split_scheme={data['split_scheme']}" if data.get("split_scheme") else "")))
    tr, te = _shape(data)
    mb = train_cfg.get("meta_batch_size")
    rows.append(("episodes", f"train {tr}" + (f", {mb} tasks per step" if mb else "")
                 + f"; val/test {te}"))
    bb = f"{label('backbone', backbone)}  {_settings(backbone, skip=tuple(dev.keys()))}".rstrip()
    if n_params is not None:
        bb += f"  ({n_params:,} parameters)"
    rows.append(("backbone", bb))
    rows.append(("device", _runtime_text(cfg, runtime)))
    for k, v in (auto or {}).items():  # what device.*=auto chose, as the learner/backbone report it
        rows.append((k, str(v)))
    if train_cfg:
        steps = f"{train_cfg.get('steps', '?'):,} steps" if isinstance(train_cfg.get("steps"), int) else "?"
        val = (f", validation every {train_cfg.get('val_every')} ({train_cfg.get('val_episodes')} episodes)"
               if train_cfg.get("split", "train") != "trainval" else ", no validation (trained on trainval)")
        rows.append(("training", steps + val + (f", test {eval_cfg.get('n_episodes')} episodes" if eval_cfg else "")))
    presets = [f"{g}={groups[g]}" for g in ("experiment", "paper", "debug") if groups.get(g)]
    if presets:
        rows.append(("presets", " ".join(presets)))
    rows.append(("run dir", str(run_dir)))
    if logger_where:
        rows.append(("logger", f"{(cfg.get('logger') or {}).get('kind', '?')}: {logger_where}"))
    return rows


def print_banner(cfg: Mapping[str, Any], run_dir: str | Path, runtime: Any = None, n_params: int | None = None,
                 logger_where: str | None = None, choices: Mapping[str, str] | None = None,
                 auto: Mapping[str, str] | None = None, title: str | None = None) -> None:
    """Print the start-of-run banner. ``runtime``: the resolved :class:`~fewshot_runner.engine.device.Runtime`
    (device, precision and what ``precision=auto`` chose, channels_last, task threads...); ``n_params``: the
    learner's parameter count; ``logger_where``: ``logger.describe()``; ``choices``: Hydra's group choices
    (default: read from Hydra); ``auto``: further choices of ``auto`` settings by label, e.g.
    ``{"fused ops": "on (C++ BN+ReLU+max-pool)", "task execution": "grouped convolutions"}``;
    ``title``: default ``fewshot train: <experiment name>``."""
    if title is None:
        from fewshot_runner.loggers.runinfo import run_identity

        title = f"fewshot train: {run_identity(cfg, choices)[0]}"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for k, v in banner_rows(cfg, run_dir, runtime, n_params, logger_where, choices, auto):
        grid.add_row(k, v)
    console.print(Text(title, style="bold"))
    console.print(grid)


def config_tree(cfg: Any, choices: Mapping[str, str] | None = None) -> Tree:
    """The resolved config as a rich Tree: one branch per group (``algo (maml)``), a leaf per key."""
    from omegaconf import DictConfig, OmegaConf

    groups = _choices() if choices is None else dict(choices)
    if isinstance(cfg, DictConfig):
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - an unresolvable interpolation: show it as written
            plain = OmegaConf.to_container(cfg, resolve=False)
    else:
        plain = dict(cfg)
    tree = Tree("[bold]config[/bold]", guide_style="dim")

    def add(node: Tree, key: str, value: Any, top: bool) -> None:
        if isinstance(value, Mapping):
            head = Text(key, style="bold")
            if top and groups.get(key):
                head.append(f" ({groups[key]})", style="cyan")
            branch = node.add(head)
            for k, v in value.items():
                add(branch, str(k), v, False)
        else:
            node.add(Text(f"{key}: {_yaml_scalar(value)}"))

    for k, v in plain.items():
        if k != "hydra":
            add(tree, str(k), v, True)
    return tree


def _yaml_scalar(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def print_config_tree(cfg: Any, choices: Mapping[str, str] | None = None) -> None:
    """Print :func:`config_tree` (for ``fewshot train ... print_config=true``-style use)."""
    console.print(config_tree(cfg, choices))
