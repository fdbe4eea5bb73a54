"""What makes a run findable and comparable in Comet or TensorBoard: its name and tags (from the
config and Hydra's choices) and the run info (host, OS, Python, torch, CPU/GPU, git, command line).

No torch import here: the torch version is read from the installed package's metadata, the GPU
model only where torch is already imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewshot_runner.loggers.base import is_secret_key

_GIT_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------- identity
def hydra_choices() -> dict[str, str]:
    """Hydra's group choices of the running job (``algo: maml``, ``experiment: ...``), or {}."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        choices = {str(k): str(v) for k, v in hc.runtime.choices.items() if v is not None}
        return {k: v for k, v in choices.items() if k.split("@")[0] not in OPTIONAL_BY_NAME or _exists(k, v)}
    except Exception:  # noqa: BLE001 - naming a run must never fail it
        return {}


# groups train.yaml selects by an interpolated name (``optional paper: ${algo}_${data}``): Hydra records the
# name as chosen even where no such file exists (most algorithm x data pairs have no paper setup)
OPTIONAL_BY_NAME = ("paper", "paper_net")


def _exists(key: str, name: str) -> bool:
    from pathlib import Path

    from fewshot_runner.config import conf_dir

    return (Path(conf_dir()) / key.split("@")[0] / f"{name}.yaml").exists()


def _sweep_job() -> tuple[str, int] | None:
    """(sweep dir name, job number) inside a multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if hc.mode == RunMode.MULTIRUN:
                return Path(str(hc.sweep.dir)).name, int(hc.job.num)
    except Exception:  # noqa: BLE001
        pass
    return None


def _short(target: Any) -> str:
    return str(target or "?").rsplit(".", 1)[-1].lower()


def shape_of(data: Mapping[str, Any]) -> str:
    """``5w1s``: the validation/test episode shape."""
    return f"{data.get('n_way', '?')}w{data.get('n_shot', '?')}s"


def run_identity(cfg: Mapping[str, Any], choices: Mapping[str, str] | None = None,
                 job: str = "train") -> tuple[str, list[str]]:
    """The default experiment name and the tags of a run.

    Name: ``<algo>-<dataset>-<n_way>w<n_shot>s-seed<seed>`` (e.g. ``maml-omniglot-5w1s-seed0``); ``eval-``
    before it for ``fewshot eval``; ``-job<N>`` after it in a sweep.  The algorithm and dataset are the
    config group choices (``fomaml``, not the class ``MAML``) where Hydra knows them, else the class
    names.  Tags: algorithm, dataset, shape, the training shape where it differs (``train:60w1s``),
    the preset (``experiment``), the ``debug`` preset, ``eval`` for an eval run, and ``sweep:<dir>``.
    """
    choices = dict(hydra_choices() if choices is None else choices)
    data = cfg.get("data") or {}
    algo_name = choices.get("algo") or _short((cfg.get("algo") or {}).get("_target_"))
    data_name = choices.get("data") or _short(data.get("_target_"))
    shape = shape_of(data)
    name = f"{algo_name}-{data_name}-{shape}-seed{cfg.get('seed', 0)}"
    tags = [algo_name, data_name, shape]
    train_shape = f"{data.get('train_n_way') or data.get('n_way')}w{data.get('train_n_shot') or data.get('n_shot')}s"
    if train_shape != shape:
        tags.append(f"train:{train_shape}")
    for group in ("experiment", "debug"):
        if choices.get(group):
            tags.append(choices[group])
    if job != "train":
        name, tags = f"{job}-{name}", [*tags, job]
    sweep = _sweep_job()
    if sweep is not None:
        name += f"-job{sweep[1]}"
        tags.append(f"sweep:{sweep[0]}")
    return name, tags


# ----------------------------------------------------------------------------- run info
def collect_run_info(run_dir: str | Path | None = None) -> dict[str, Any]:
    """Host, OS, Python, torch, CPU and GPU models, git branch/commit/dirty of the code that runs, the
    command line (API keys redacted) and its overrides.  Values that cannot be found are None."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "fewshot_runner": _version("fewshot_runner"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_model(),
    }
    info.update(git_info(Path(__file__).resolve().parent))
    info["command"] = command_line()
    overrides = _task_overrides()
    if overrides is not None:
        info["overrides"] = " ".join(_redact_arg(o) for o in overrides)
    if run_dir is not None:
        info["run_dir"] = str(Path(run_dir).resolve())
    return info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """``AMD EPYC 9R14 96-Core Processor``: /proc/cpuinfo on Linux, sysctl on macOS, else platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=_GIT_TIMEOUT_S)
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or None


def gpu_model() -> str | None:
    """The CUDA GPUs torch sees (``NVIDIA H100 80GB HBM3 x2``), or None; only if torch is imported."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return None
    if not names:
        return None
    uniq = list(dict.fromkeys(names))
    return ", ".join(f"{n} x{names.count(n)}" for n in uniq)


def git_info(where: Path) -> dict[str, Any]:
    """``git_branch``, ``git_commit``, ``git_dirty`` (tracked files changed) of the repository holding
    ``where``; all None outside a git checkout (an installed wheel)."""
    out = {"git_branch": None, "git_commit": None, "git_dirty": None}
    try:
        p = subprocess.run(["git", "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, cwd=where)
    except (OSError, subprocess.SubprocessError):
        return out
    if p.returncode != 0:
        return out
    dirty = False
    for line in p.stdout.splitlines():
        if line.startswith("# branch.oid "):
            oid = line.split()[-1]
            out["git_commit"] = None if oid == "(initial)" else oid
        elif line.startswith("# branch.head "):
            head = line.split(" ", 2)[-1]
            out["git_branch"] = None if head == "(detached)" else head
        elif line and not line.startswith("#"):
            dirty = True
    out["git_dirty"] = dirty
    return out


_SECRET_VALUE = re.compile(r"^([^=]*api[_\-]?key[^=]*=).*$", re.IGNORECASE)


def _redact_arg(arg: str) -> str:
    m = _SECRET_VALUE.match(arg)
    if m:
        return m.group(1) + "***"
    key = os.environ.get("COMET_API_KEY", "").strip()
    return arg.replace(key, "***") if key and key in arg else arg


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (``fewshot train algo=maml ...``; the CLI names itself in sys.argv[0]),
    quoted for the shell, values of API-key options replaced by ``***``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = argv[0] if argv[0].startswith("fewshot") else Path(argv[0]).name
    return " ".join([head, *(shlex.quote(_redact_arg(a)) for a in argv[1:])])


def _task_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # noqa: BLE001
        pass
    return None

