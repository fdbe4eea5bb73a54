"""``train(cfg)`` and ``evaluate_checkpoint(cfg)``: plain functions that return their metrics.

The Hydra entry points in :mod:`fewshot_runner.cli` only wrap these, so tests call them with
a config from ``compose(...)``.

Runs survive faults:

* Resume: ``resume=auto`` (``<run dir>/checkpoints/last.pt``) or ``resume=PATH`` restores the
  model, optimizer, LR scheduler, sampler, the Python/NumPy/torch RNGs, the best validation
  score, the logging window and the step, and cuts ``metrics.jsonl`` back to that step, so a
  killed run, resumed, ends bitwise equal to an uninterrupted one (on the same device).
* SIGINT/SIGTERM: the current step finishes, ``last.pt`` is written, the loggers are closed,
  and the exit message says how to resume (exit code 130/143).  A second signal stops at once.
* A non-finite loss stops the run (``train.on_nan=stop``, the default; the last checkpoint is
  kept) or skips that update (``skip``: the model, its buffers and the optimizer stay as they
  were).  A checkpoint is never written with non-finite weights.
* Checkpoints and results are written atomically (:func:`checkpoint.atomic_write`).

Testing hook: ``$FEWSHOT_FAULT`` injects faults at chosen points (see :class:`FaultPlan`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fewshot_runner import __version__
from fewshot_runner.data.base import EpisodicDataset
from fewshot_runner.data.sampler import EpisodeSampler, check_episode_shape
from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.engine.console import console, progress_bar, results_table
from fewshot_runner.engine.device import Runtime, resolve_runtime
from fewshot_runner.engine.ema import WeightAverage, eval_weights
from fewshot_runner.engine.evaluate import evaluate
from fewshot_runner.engine.graphs import GraphedStep
from fewshot_runner.engine.memory import MB, ChunkPlanner, chunk_bounds, measure_peak
from fewshot_runner.episode import Episode
from fewshot_runner.errors import CheckpointError, UserError

EPISODE_KEYS = ("n_way", "n_shot", "n_query", "train_n_way", "train_n_shot", "train_n_query")
STATUS_EVERY_S = 30.0  # plain status lines when no progress bar is drawn (see _train)


class NumericalError(UserError):
    exit_code = 3


class Interrupted(Exception):
    """Raised after a graceful stop wrote its checkpoint."""


# ----------------------------------------------------------------------------- building
def instantiate_node(node, **kwargs):
    """``hydra.utils.instantiate``, re-raising a UserError from the target as itself (Hydra
    wraps exceptions from targets in InstantiationException)."""
    try:
        return instantiate(node, **kwargs)
    except Exception as e:
        cause = e
        while cause is not None:
            if isinstance(cause, UserError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise


def build_dataset(data_cfg) -> EpisodicDataset:
    """Instantiate the data set from its config, without the episode-shape keys."""
    node = OmegaConf.to_container(data_cfg, resolve=True)
    for k in EPISODE_KEYS:
        node.pop(k, None)
    return instantiate_node(node)


@dataclass
class Shape:
    n_way: int
    n_shot: int
    n_query: int


def episode_shapes(data_cfg) -> tuple[Shape, Shape]:
    """(train shape, evaluation shape)."""
    ev = Shape(data_cfg.n_way, data_cfg.n_shot, data_cfg.n_query)
    tr = Shape(data_cfg.get("train_n_way") or ev.n_way, data_cfg.get("train_n_shot") or ev.n_shot,
               data_cfg.get("train_n_query") or ev.n_query)
    return tr, ev


def build_learner(cfg, x_shape: tuple[int, ...], n_way: int, runtime: Runtime):
    backbone = instantiate_node(cfg.backbone, x_shape=tuple(x_shape))
    with torch.no_grad():
        was = backbone.training
        backbone.train()
        feature_dim = int(backbone(torch.zeros(2, *x_shape)).shape[-1])
        backbone.train(was)
    algo = instantiate_node(cfg.algo, backbone=backbone, n_way=n_way, feature_dim=feature_dim)
    algo = algo.to(runtime.device)
    if runtime.channels_last:
        from fewshot_runner.backbones import use_channels_last

        algo = use_channels_last(algo)
    if runtime.compile:
        check_compile(type(algo))
        algo.compile_for_speed()
    return algo


def check_compile(learner_cls: type) -> None:
    """device.compile=true needs a learner that defines compile_for_speed (see algorithms/base.py)."""
    if getattr(learner_cls, "compile_for_speed", None) is None:
        raise UserError(f"{learner_cls.__name__} does not support device.compile=true (torch.compile cannot "
                        f"differentiate through its inner loop); use device.compile=false")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (a resume restores all three)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- outer steps
def gradient_outer_step(algo, optimizer, episodes: Episode, runtime: Runtime, task_chunk: int | None,
                        grad_clip: float | None, planner: ChunkPlanner | None = None,
                        graphed: GraphedStep | None = None) -> dict[str, float]:
    """Zero grads, accumulate the meta-gradient over task chunks, step.

    The chunks: ``task_chunk`` tasks each (None: the whole batch), or, with a ``planner``
    (``device.memory_cap_mb``), as many as fit under its cap (its first step measures them: 1 task,
    then 2, then the rest).  ``graphed`` (``device.cuda_graphs``, once the chunks are known): the
    forward and backward of every chunk replayed as one CUDA graph.

    Returns the metrics averaged over tasks (and ``peak_mem_mb`` where measured).  A non-finite
    loss skips the update and is reported by the caller (metrics["loss"] is then nan/inf).
    """
    n = episodes.n_tasks
    bounds = planner.bounds(n) if planner is not None else chunk_bounds(0, n, task_chunk or n)
    out = graphed.run(episodes, bounds) if graphed is not None and bounds is not None else None
    if out is not None:  # (no zero_grad: the replay overwrites the captured .grad tensors, see graphs.py)
        sums = {k: float(v) for k, v in out.items()}
        _update(algo, optimizer, sums, grad_clip)
        return sums
    optimizer.zero_grad(set_to_none=True)
    planning_step = bounds is None  # the planner's first step: every chunk measured (on CPU only then), in this thread
    if planning_step:
        bounds = planner.probe_bounds(n)
    measure = planning_step or (planner is not None and runtime.device.type == "cuda")
    sums: dict[str, float] = {}
    peaks: list[tuple[int, int]] = []
    threads = task_threads_for(algo, episodes, runtime)
    i = 0
    while i < len(bounds):
        s, e = bounds[i]
        part = episodes.tasks(s, e)
        w = part.n_tasks / n
        with measure_peak(runtime.device) if measure else contextlib.nullcontext([0]) as peak:
            if threads > 1 and not planning_step:  # (the CPU probe counts this thread's saved tensors)
                metrics = _threaded_backward(algo, part, runtime, threads, w)
            else:
                with runtime.autocast():
                    loss, metrics = algo.meta_loss(part)
                if torch.isfinite(loss):
                    (loss * w).backward()
        if measure:
            peaks.append((e - s, peak[0]))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
        i += 1
        if planning_step and planner.chunk is None and i == len(bounds):  # the probe chunks done: fit, go on
            bounds += chunk_bounds(bounds[-1][1], n, planner.fit(n, peaks))
    if planner is not None and peaks:  # the largest chunk's peak (the probe chunks are smaller)
        planner.observe([m / MB for _, m in peaks])
        sums["peak_mem_mb"] = planner.last_peak_mb
    _update(algo, optimizer, sums, grad_clip)
    return sums


def _update(algo, optimizer, sums: dict[str, float], grad_clip: float | None) -> None:
    if math.isfinite(sums["loss"]):
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(algo.parameters(), grad_clip)
        optimizer.step()


def step_helpers(algo, runtime: Runtime, train_cfg) -> tuple[ChunkPlanner | None, GraphedStep | None]:
    """The memory-cap planner and the CUDA-graph step of :func:`gradient_outer_step`, as the run's
    settings ask; chunking a learner whose tasks are not independent is refused in one line."""
    outer_step = getattr(algo, "outer_step", None)
    chunk = train_cfg.task_chunk
    splits = "device.memory_cap_mb" if runtime.memory_cap_mb is not None else (
        "train.task_chunk" if chunk and chunk < train_cfg.meta_batch_size else None)
    if splits and (outer_step is not None or not getattr(algo, "independent_tasks", False)):
        raise UserError(f"{splits} splits a meta-batch into chunks of tasks, which changes {type(algo).__name__}'s "
                        f"objective (its tasks share batch norm or its update); set {splits}=null and lower "
                        f"train.meta_batch_size instead")
    planner = ChunkPlanner(runtime.memory_cap_mb) if runtime.memory_cap_mb is not None else None
    graphed = GraphedStep(algo, runtime) if runtime.cuda_graphs and outer_step is None else None
    return planner, graphed


# ----------------------------------------------------------------------------- task threads
# device.task_threads: the tasks of a meta-batch in worker threads of one intra-op thread each
# (CPU, per-task loop).  A task's ops are too small to keep two cores busy one op at a time (the
# Python between ops, the small support-set and deep-layer ops); two tasks at once do.  Measured
# here (2 cores, MAML 5w1s 15 queries, 32 tasks): 1,440 vs 1,800 ms per step.  torch.func's
# functional_call swaps a module's attributes while it runs, so each worker has its own replica of
# the learner's modules, holding the SAME parameter tensors: gradients reach the real leaves.  Each
# worker returns the gradient of its group of tasks; the groups are contiguous and their gradients
# summed in group order, so a step is deterministic (the same bits on every run).
_task_pool: dict[int, Any] = {}
_replicas: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def task_threads_for(algo, episodes: Episode, runtime: Runtime) -> int:
    """How many task threads this step uses: 1 unless the learner's tasks are independent
    (``independent_tasks``; MAML), it runs them one by one (not vmapped), on CPU."""
    k = min(runtime.task_threads, episodes.n_tasks)
    if k <= 1 or runtime.device.type != "cpu" or not getattr(algo, "independent_tasks", False):
        return 1
    loops = getattr(algo, "runs_tasks_one_by_one", None)
    return k if loops is None or loops(episodes) else 1


def _share_parameters(replica: torch.nn.Module, original: torch.nn.Module) -> None:
    """Point the replica's parameters and buffers at the original's tensors (each module keeps its
    own dicts: functional_call swaps entries in them) and copy its plain settings (``training``,
    ``batch_tasks``, ``inner_lr``, ...), so a setting changed on the learner reaches its replicas."""
    for (_, a), (_, b) in zip(replica.named_modules(), original.named_modules(), strict=True):
        for k, v in vars(b).items():
            if isinstance(v, (bool, int, float, str)) and not k.startswith("__"):
                setattr(a, k, v)
        for k in a._parameters:
            a._parameters[k] = b._parameters[k]
        for k in a._buffers:
            a._buffers[k] = b._buffers[k]


def _workers(algo, k: int):
    import copy
    from concurrent.futures import ThreadPoolExecutor

    reps = _replicas.get(algo, [])
    while len(reps) < k:  # (replicas hold the learner's parameters, never the learner itself)
        reps.append(copy.deepcopy(algo))
    _replicas[algo] = reps
    for r in reps[:k]:  # every step: .to(dtype) and the like may have put new tensors in the learner
        _share_parameters(r, algo)
    pool = _task_pool.get(k)
    if pool is None:
        pool = _task_pool[k] = ThreadPoolExecutor(max_workers=k, thread_name_prefix="fewshot-task",
                                                  initializer=torch.set_num_threads, initargs=(1,))
    return pool, reps[:k]


def _threaded_backward(algo, part: Episode, runtime: Runtime, k: int, weight: float) -> dict[str, torch.Tensor]:
    """Accumulate ``weight`` x the meta-gradient of ``part`` into ``.grad``, its tasks split into k
    contiguous groups run in k threads; returns the metrics averaged over the tasks of ``part``."""
    pool, replicas = _workers(algo, k)
    params = [p for p in algo.parameters() if p.requires_grad]
    n = part.n_tasks
    bounds = [round(i * n / k) for i in range(k + 1)]

    def work(i: int):
        rep = replicas[i]
        group = part.tasks(bounds[i], bounds[i + 1])
        with runtime.autocast():
            loss, metrics = rep.meta_loss(group)
        share = group.n_tasks / n
        grads = None
        if torch.isfinite(loss):
            grads = torch.autograd.grad(loss * (weight * share), params, allow_unused=True)
        return share, metrics, grads

    results = [f.result() for f in [pool.submit(work, i) for i in range(k) if bounds[i + 1] > bounds[i]]]
    total: list[torch.Tensor | None] = [None] * len(params)
    for _, _, grads in results:
        if grads is None:
            continue
        for j, g in enumerate(grads):
            if g is not None:
                total[j] = g if total[j] is None else total[j] + g
    for p, g in zip(params, total):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    out: dict[str, torch.Tensor] = {}
    for share, metrics, _ in results:
        for key, v in metrics.items():
            out[key] = out.get(key, 0.0) + v.detach() * share
    return out


# ----------------------------------------------------------------------------- signals
class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.signum is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self.signum = signum

        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# ----------------------------------------------------------------------------- fault injection
FAULT_ENV = "FEWSHOT_FAULT"
FAULT_ACTIONS = ("kill", "term", "int", "enospc", "nan")
FAULT_PHASES = ("step", "val", "ckpt", "best")


@dataclass(frozen=True)
class Fault:
    action: str
    phase: str
    step: int


class FaultPlan:
    """A testing hook: deterministic faults at chosen points of training, from ``$FEWSHOT_FAULT``.

    ``FEWSHOT_FAULT="ACTION@PHASE:STEP[,ACTION@PHASE:STEP...]"``, each fault fired at most once:

    PHASE (in training step STEP, steps counted from 1):
      ``step``  after the outer update, before anything is logged (``nan``: the step's inputs
                become NaN before the update instead)
      ``val``   after the validation episodes ran, before their metrics are logged
      ``ckpt``  while ``checkpoints/last.pt`` is written: the temporary file holds half its bytes
      ``best``  the same for ``checkpoints/best.pt``
    ACTION:
      ``kill``   SIGKILL this process         ``term``/``int``  send it SIGTERM/SIGINT (a graceful stop)
      ``enospc`` raise OSError(ENOSPC), as a full disk does      ``nan`` NaN inputs (phase ``step`` only)

    e.g. ``FEWSHOT_FAULT=kill@val:6`` or ``FEWSHOT_FAULT=kill@ckpt:4,term@step:2``.  Unset, it costs nothing.
    """

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        self.fired: set[Fault] = set()

    @classmethod
    def parse(cls, spec: str | None) -> "FaultPlan":
        faults = []
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            try:
                action, rest = item.split("@", 1)
                phase, step = rest.split(":", 1)
                fault = Fault(action.strip(), phase.strip(), int(step))
            except ValueError:
                fault = None
            if fault is None or fault.action not in FAULT_ACTIONS or fault.phase not in FAULT_PHASES \
                    or (fault.action == "nan" and fault.phase != "step"):
                raise UserError(f"{FAULT_ENV}={spec!r} is not a fault list; use ACTION@PHASE:STEP with ACTION one of "
                                f"{', '.join(FAULT_ACTIONS)} and PHASE one of {', '.join(FAULT_PHASES)}, or unset it")
            faults.append(fault)
        return cls(faults)

    @classmethod
    def from_env(cls) -> "FaultPlan":
        return cls.parse(os.environ.get(FAULT_ENV))

    def _due(self, phase: str, step: int, nan: bool = False) -> list[Fault]:
        due = [f for f in self.faults if f.phase == phase and f.step == step and (f.action == "nan") == nan
               and f not in self.fired]
        self.fired.update(due)
        return due

    def poison(self, step: int) -> bool:
        """True when the inputs of training step ``step`` must be made NaN."""
        return bool(self.faults) and bool(self._due("step", step, nan=True))

    def at(self, phase: str, step: int) -> None:
        if self.faults:
            for f in self._due(phase, step):
                self._fire(f.action)

    def on_write(self, phase: str, step: int) -> Callable[[Any], None] | None:
        """A ``before_commit`` hook for :func:`checkpoint.atomic_write`, or None."""
        due = self._due(phase, step) if self.faults else []
        if not due:
            return None

        def hook(f) -> None:
            size = f.tell()
            f.truncate(size // 2)  # a torn temporary file, as a kill in mid-write leaves
            f.flush()
            os.fsync(f.fileno())
            for fault in due:
                self._fire(fault.action)

        return hook

    @staticmethod
    def _fire(action: str) -> None:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # not reached: SIGKILL is delivered before the call returns
        elif action in ("term", "int"):
            os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _poisoned(episodes: Episode) -> Episode:
    nan = float("nan")
    return Episode(episodes.support_x * nan, episodes.support_y, episodes.query_x * nan, episodes.query_y,
                   episodes.n_way)


# ----------------------------------------------------------------------------- run dir, resume
def _run_dir(run_dir: str | Path | None) -> Path:
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    p = Path(run_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.exists() else None
    return Path(resume).expanduser()


def check_start(cfg: DictConfig, run_dir: str | Path) -> tuple[dict | None, Path | None]:
    """What can be checked before a run writes anything: the device (and device.compile against the
    learner), that the run dir holds no other run (unless resuming), and the checkpoint to resume from.

    Returns ``(state, path)`` of the checkpoint to resume from, or ``(None, None)``.  Raises a
    one-line UserError.  The CLI calls this before Hydra starts; :func:`train` calls it too.
    """
    run_dir = Path(run_dir)
    if resolve_runtime(cfg.device).compile:  # before the data is read: refused in seconds, not minutes
        import importlib

        module, _, name = str(cfg.algo._target_).rpartition(".")
        try:  # not hydra's get_class: it logs a multi-line error of its own before raising
            learner_cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise UserError(f"algo._target_={cfg.algo._target_} cannot be imported ({type(e).__name__}); "
                            f"choose a learner with algo=NAME (see `fewshot train --help`)") from None
        check_compile(learner_cls)
    if cfg.device.get("memory_cap_mb") is not None and cfg.train.get("task_chunk"):
        raise UserError(f"train.task_chunk={cfg.train.task_chunk} and device.memory_cap_mb="
                        f"{cfg.device.memory_cap_mb} both set the chunks of a batch; keep one (the other null)")
    if cfg.resume == "auto" and (run_dir / "results.json").exists():
        return None, None  # done already: train() skips it
    if not cfg.resume:
        held = [f for f in ("results.json", "checkpoints/last.pt") if (run_dir / f).exists()]
        if held:
            raise UserError(f"{run_dir} already holds a run ({held[0]}); resume it with resume=auto, "
                            f"or choose a new hydra.run.dir (or hydra.sweep.dir)")
    path = _resolve_resume(cfg.resume, run_dir)
    if path is None:
        return None, None
    state = ckpt.load_checkpoint(path)
    _check_same_run(state["config"], cfg, path)
    return state, path


def _check_same_run(saved: dict, cfg: DictConfig, path: Path) -> None:
    """A resumed run must be the same model and algorithm."""
    now = OmegaConf.to_container(cfg, resolve=True)
    for key in ("algo", "backbone"):
        if saved.get(key, {}).get("_target_") != now[key].get("_target_"):
            raise CheckpointError(f"checkpoint {path} was trained with {key} {saved.get(key, {}).get('_target_')}, "
                                  f"not {now[key].get('_target_')}; resume with the same {key}= as the original run")
    # the optimizer's and scheduler's states come back from the checkpoint, so a changed learning rate or
    # schedule would be ignored without a word (and a cosine schedule is fixed to its train.steps)
    was, cur = saved.get("train") or {}, now.get("train") or {}
    keys = ["lr_schedule", "outer_lr", "lr_decay_every", "lr_decay", "lr_min"]
    if was.get("lr_schedule", "step") == "cosine":
        keys.append("steps")
    changed = [k for k in keys if k in was and was.get(k) != cur.get(k)]
    if changed:
        then = " ".join(f"train.{k}={was[k]}" for k in changed)
        raise CheckpointError(f"checkpoint {path} was trained with {then}, which its optimizer and learning-rate "
                              f"schedule carry on; resume with {then}"
                              + (" (a cosine schedule is fixed to its steps; to train longer, start a new run "
                                 "from scratch, or use train.lr_schedule=step)" if "steps" in changed else ""))
    ema_then = float(was.get("ema_decay") or 0.0)  # checkpoints from before the key: no average
    if ema_then != float(cur.get("ema_decay") or 0.0):
        raise CheckpointError(f"checkpoint {path} was trained with train.ema_decay={ema_then}, which its weight "
                              f"average carries on; resume with train.ema_decay={ema_then}")
    if saved["data"].get("n_way") != now["data"].get("n_way") and "MAML" in str(now["algo"].get("_target_")):
        raise CheckpointError(f"checkpoint {path} has a {saved['data'].get('n_way')}-way head; resume with "
                              f"data.n_way={saved['data'].get('n_way')}")


def _adopt_run_files(resume_path: Path, run_dir: Path) -> None:
    """``resume=PATH`` of another run dir: bring its metrics.jsonl and best.pt along (if this
    dir has none), so the resumed run's history and final test are those of one run."""
    src = resume_path.parent.parent
    if resume_path.parent.name != "checkpoints" or not src.is_dir():
        return
    try:
        if src.resolve() == run_dir.resolve():
            return
    except OSError:
        return
    for rel in ("metrics.jsonl", "checkpoints/best.pt"):
        if (src / rel).is_file() and not (run_dir / rel).exists():
            data = (src / rel).read_bytes()
            ckpt.atomic_write(run_dir / rel, lambda f, data=data: f.write(data))


def _is_final_record(line: str) -> bool:
    try:
        rec = json.loads(line)
    except ValueError:
        return False
    return isinstance(rec, dict) and any(str(k).startswith("test/") for k in rec)


def _drop_final_records(path: Path) -> None:
    """Remove the test metrics of an interrupted final phase: a resumed run logs them again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [ln for ln in lines if not _is_final_record(ln)]
    if len(kept) != len(lines):
        text = "".join(ln + "\n" for ln in kept).encode()
        ckpt.atomic_write(path, lambda f: f.write(text))


def make_scheduler(optimizer: torch.optim.Optimizer, train_cfg):
    """The outer learning-rate schedule of ``train.lr_schedule`` (None: a constant rate)."""
    if train_cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train_cfg.steps,
                                                          eta_min=train_cfg.outer_lr * train_cfg.lr_min)
    if train_cfg.lr_decay_every:
        return torch.optim.lr_scheduler.StepLR(optimizer, train_cfg.lr_decay_every, train_cfg.lr_decay)
    return None


def _restore(state: dict, path: Path, algo, optimizer, scheduler, sampler, average: WeightAverage | None) -> None:
    try:
        algo.load_state_dict(state["model"])
    except RuntimeError as e:
        why = str(e).splitlines()[-1].strip()[:160]
        raise CheckpointError(f"checkpoint {path} does not fit this model ({why}); resume with the backbone and "
                              f"algo settings of the original run (its config.yaml)") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if average is not None:
            average.load_state_dict(state["ema"])
        float(state["best_val_acc"]), int(state["best_step"])
        if not isinstance(state["rng"], dict):
            raise TypeError("rng is not a dict")
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} lacks or has a broken training state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''}); resume from a last.pt written by "
                              f"`fewshot train`, or start afresh without resume=") from None


def _restore_rng(rng: dict, path: Path) -> None:
    try:
        ckpt.set_rng_state(rng)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} has a broken RNG state ({type(e).__name__}); resume from a "
                              f"last.pt written by `fewshot train`, or start afresh without resume=") from None


def _resume_hint(run_dir: Path) -> str:
    """The command that resumes this run (the same command line plus resume=auto)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get() if HydraConfig.initialized() else None
    except ImportError:  # pragma: no cover
        hc = None
    if hc is None or not sys.argv or not sys.argv[0].startswith("fewshot "):
        return f"resume with resume=auto and the same run dir ({run_dir})"
    args = [a for a in sys.argv[1:] if not a.startswith("resume=")]
    if hc.mode == RunMode.MULTIRUN:
        if not any(a.startswith("hydra.sweep.dir=") for a in args):
            args.append(f"hydra.sweep.dir={hc.sweep.dir}")
    elif not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    return "resume with: " + " ".join(shlex.quote(a) for a in [*sys.argv[0].split(), *args, "resume=auto"])


def _clock(seconds: float) -> str:
    """Elapsed time as H:MM:SS."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _write_json(path: Path, obj: dict) -> None:
    ckpt.atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _say(msg: str, err: bool = False) -> None:
    """One plain message line (no markup, no wrapping: paths and commands stay copyable)."""
    if err:
        print(msg, file=sys.stderr, flush=True)
    else:
        console.print(msg, markup=False, highlight=False, soft_wrap=True)


def _run_runtime(device_cfg: DictConfig) -> Runtime:
    """The runtime of a train or eval run, saying what ``device.precision=auto`` chose."""
    runtime = resolve_runtime(device_cfg)
    if runtime.precision_note:
        _say(f"device.precision=auto: {runtime.precision_note}")
    return runtime


def _make_logger(logger_cfg: DictConfig, run_dir: Path, truncate_after_step: int):
    """The run's loggers from the ``logger`` group (train and eval alike)."""
    from fewshot_runner.loggers import make_logger

    return make_logger(logger_cfg.kind, run_dir, project_name=logger_cfg.get("project_name"),
                       workspace=logger_cfg.get("workspace"), experiment_name=logger_cfg.get("experiment_name"),
                       tags=list(logger_cfg.get("tags") or []), truncate_after_step=truncate_after_step)


def _close(logger) -> list[str]:
    try:
        return logger.close()
    except Exception as e:  # noqa: BLE001 - closing must not hide the error that stopped the run
        return [f"warning: closing the loggers failed ({type(e).__name__}: {e})"]


def _oom_message(cfg, step: int) -> str:
    return (f"out of GPU memory in training step {step} (train.meta_batch_size={cfg.train.meta_batch_size}); "
            f"set device.memory_cap_mb (MiB, e.g. half the GPU's memory) to split each batch into chunks that fit, "
            f"or train.task_chunk=N; then resume=auto (the last checkpoint is kept)")


def _finite_model(algo) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in algo.parameters())


# ----------------------------------------------------------------------------- train
def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train, keep the best model on validation episodes, test it; return the results dict.

    SIGINT/SIGTERM are caught for the whole run: training stops after the current step with a
    checkpoint (exit code 130/143 through ``SystemExit``).
    """
    stop = StopFlag()
    with stop.installed():
        return _train(cfg, run_dir, stop)


def _train(cfg: DictConfig, run_dir: str | Path | None, stop: StopFlag) -> dict[str, Any]:
    from fewshot_runner.plots import save_curves

    t_start = time.time()
    faults = FaultPlan.from_env()
    run_dir = _run_dir(run_dir)
    results_path = run_dir / "results.json"
    if cfg.resume == "auto" and results_path.exists():
        _say(f"done already: {results_path} exists (resume=auto); skipping")
        return json.loads(results_path.read_text())

    state, resume_path = check_start(cfg, run_dir)
    runtime = _run_runtime(cfg.device)

    dataset = build_dataset(cfg.data)
    tr, ev = episode_shapes(cfg.data)
    train_on = cfg.train.split
    train_split, val_split, test_split = dataset.split(train_on), dataset.split("val"), dataset.split(cfg.eval.split)
    validate = train_on != "trainval"  # trainval holds the validation classes: keep the last model
    check_episode_shape(train_split, tr.n_way, tr.n_shot, tr.n_query)
    check_episode_shape(val_split, ev.n_way, ev.n_shot, ev.n_query)
    check_episode_shape(test_split, ev.n_way, ev.n_shot, ev.n_query)

    seed_everything(cfg.seed)
    algo = build_learner(cfg, dataset.x_shape, tr.n_way, runtime)
    algo.check_n_way(ev.n_way)
    optimizer = torch.optim.Adam(algo.parameters(), lr=cfg.train.outer_lr)
    scheduler = make_scheduler(optimizer, cfg.train)
    average = WeightAverage(algo, cfg.train.ema_decay) if cfg.train.ema_decay else None
    sampler = EpisodeSampler(train_split, tr.n_way, tr.n_shot, tr.n_query, seed=cfg.seed + 1)
    outer_step = getattr(algo, "outer_step", None)
    planner, graphed = step_helpers(algo, runtime, cfg.train)

    ckpt_dir = run_dir / "checkpoints"
    start_step, best_acc, best_step, wall_before = 0, -1.0, -1, 0.0
    window: dict[str, list[float]] = {}
    if state is not None:
        _restore(state, resume_path, algo, optimizer, scheduler, sampler, average)
        start_step = int(state["step"])
        best_acc, best_step = float(state["best_val_acc"]), int(state["best_step"])
        window = {k: [float(x) for x in v] for k, v in (state.get("log_window") or {}).items()}
        wall_before = float(state.get("wall_time", 0.0))
        if planner is not None and (state.get("chunk_plan") or {}).get("cap_mb") == planner.cap_mb:
            planner.chunk = int(state["chunk_plan"]["chunk"])  # the same chunks as before the stop: same bits
        _adopt_run_files(resume_path, run_dir)
        _say(f"resuming from {resume_path} at step {start_step}")
    if cfg.resume:
        ckpt.remove_stale_temp_files(ckpt_dir)  # torn saves of a killed run
        _drop_final_records(run_dir / "metrics.jsonl")

    config_plain = OmegaConf.to_container(cfg, resolve=True)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True).encode()
    ckpt.atomic_write(run_dir / "config.yaml", lambda f: f.write(config_yaml))
    # a fresh run cuts metrics.jsonl to nothing, a resumed one back to its checkpoint's step
    logger = _make_logger(cfg.logger, run_dir, truncate_after_step=start_step)

    def snapshot(step: int) -> dict[str, Any]:
        return {
            "config": config_plain, "step": step, "model": algo.state_dict(),
            "ema": average.state_dict() if average is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "sampler": sampler.state_dict(), "rng": ckpt.rng_state(), "best_val_acc": best_acc,
            "best_step": best_step, "log_window": window, "wall_time": wall_before + time.time() - t_start,
            "chunk_plan": {"cap_mb": planner.cap_mb, "chunk": planner.chunk} if planner is not None else None,
        }

    def save(name: str, step: int) -> None:
        if not _finite_model(algo):
            raise NumericalError(f"the model's weights became non-finite by step {step}; the learning rate is "
                                 f"likely too high (train.outer_lr={cfg.train.outer_lr}); {ckpt_dir / name} was "
                                 f"kept as it was; lower the learning rate or set train.grad_clip")
        hook = faults.on_write("best" if name == "best.pt" else "ckpt", step)
        ckpt.save_checkpoint(ckpt_dir / name, snapshot(step), before_commit=hook)

    skip_nan = cfg.train.on_nan == "skip"
    step, saved_at = start_step, -1
    try:
        logger.log_params(config_plain)
        commit = git_commit()
        if commit:
            logger.log_other("git_commit", commit)
        if stop:
            raise Interrupted(f"stopped by {stop.name} before step {step + 1}; nothing new to save")
        if state is not None:  # last, after anything that draws from them (importing comet_ml does)
            _restore_rng(state["rng"], resume_path)
        algo.train()
        # Where the bar is not drawn (a pipe, a SLURM log, train.progress=false), plain status lines
        # say how the run goes, at most one every STATUS_EVERY_S seconds and at the last step.
        plain = not (cfg.train.progress and console.is_terminal)
        with progress_bar(cfg.train.progress) as bar:
            task = bar.add_task("train", total=cfg.train.steps, completed=start_step, stats="")
            t_last, s_last = time.time(), start_step
            t_said = t_last
            while step < cfg.train.steps:
                episodes = sampler.sample(cfg.train.meta_batch_size)
                if runtime.device.type == "cuda":  # page-locked, so the copy below is asynchronous
                    episodes = episodes.pin_memory()
                episodes = episodes.to(runtime.device, non_blocking=True)
                if faults.poison(step + 1):
                    episodes = _poisoned(episodes)
                buffers = [b.detach().clone() for b in algo.buffers()] if skip_nan else []
                if outer_step is not None:
                    metrics = outer_step(episodes, optimizer)
                else:
                    try:
                        metrics = gradient_outer_step(algo, optimizer, episodes, runtime, cfg.train.task_chunk,
                                                      cfg.train.grad_clip, planner, graphed)
                    except torch.cuda.OutOfMemoryError:
                        raise UserError(_oom_message(cfg, step + 1)) from None
                    if graphed is not None and graphed.failed:
                        _say(f"warning: {graphed.failed}; going on without CUDA graphs (device.cuda_graphs=off)")
                        graphed = None
                    for msg in planner.messages if planner is not None else ():
                        _say(msg)
                        logger.log_other("task_chunk", planner.chunk)
                    if planner is not None:
                        planner.messages.clear()
                step += 1
                faults.at("step", step)
                if not math.isfinite(metrics["loss"]):
                    msg = (f"the training loss became {metrics['loss']} at step {step}; the learning rate is "
                           f"likely too high (train.outer_lr={cfg.train.outer_lr}"
                           + (f", algo.inner_lr={cfg.algo.inner_lr}" if "inner_lr" in cfg.algo else "") + ")")
                    if not skip_nan:
                        good = ckpt_dir / "last.pt"
                        raise NumericalError(msg + (f"; the last good checkpoint is {good}" if good.exists() else "")
                                             + "; lower it, or set train.on_nan=skip")
                    with torch.no_grad():  # the forward pass may have put NaN in batch-norm statistics
                        for b, kept in zip(algo.buffers(), buffers):
                            b.copy_(kept)
                    _say(f"warning: {msg}; update skipped (train.on_nan=skip)")
                    logger.log_metrics({"train/skipped_nan": 1.0}, step)
                if average is not None and math.isfinite(metrics["loss"]):
                    average.update(algo)
                if scheduler is not None:
                    scheduler.step()
                for k, v in metrics.items():
                    v = float(v)
                    if math.isfinite(v):
                        window.setdefault(k, []).append(v)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    now = time.time()
                    sps = (step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, step
                    logged = {f"train/{k}": sum(v) / len(v) for k, v in window.items() if v}
                    logged["train/lr"] = optimizer.param_groups[0]["lr"]
                    window.clear()
                    logger.log_metrics(logged, step)
                    stats = (f"loss {logged.get('train/loss', float('nan')):.3f} "
                             f"acc {logged.get('train/acc', float('nan')):.3f} {sps:.2f} it/s")
                    bar.update(task, completed=step, stats=stats)
                    if plain and (now - t_said >= STATUS_EVERY_S or step == cfg.train.steps):
                        _say(f"step {step}/{cfg.train.steps}  {stats}  "
                             f"lr {logged['train/lr']:.3g}  {_clock(wall_before + now - t_start)}")
                        t_said = now
                if validate and (step % cfg.train.val_every == 0 or step == cfg.train.steps):
                    with average.applied(algo) if average is not None else nullcontext():
                        val = evaluate(algo, val_split, ev.n_way, ev.n_shot, ev.n_query, cfg.train.val_episodes,
                                       cfg.eval.seed, cfg.eval.chunk, runtime)
                    faults.at("val", step)
                    improved = val["acc"] > best_acc
                    if improved:
                        best_acc, best_step = val["acc"], step
                    logger.log_metrics({"val/acc": val["acc"], "val/ci95": val["ci95"], "val/best_acc": best_acc},
                                       step)
                    if improved:
                        save("best.pt", step)
                    _say(f"step {step}/{cfg.train.steps}  val acc {100 * val['acc']:.2f} % ± {100 * val['ci95']:.2f}  "
                         + ("best so far, saved best.pt" if improved
                            else f"best {100 * best_acc:.2f} % at step {best_step}"))
                if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
                    save("last.pt", step)
                    saved_at = step
                if not validate and step == cfg.train.steps:  # the model kept is the last one
                    best_step = step
                    save("best.pt", step)
                if stop:
                    if saved_at != step:
                        save("last.pt", step)
                    raise Interrupted(f"stopped by {stop.name} after step {step}; checkpoint {ckpt_dir / 'last.pt'}")

        # --- test the best model
        best_path = ckpt_dir / "best.pt"
        if best_path.exists():
            algo.load_state_dict(eval_weights(ckpt.load_checkpoint(best_path)))
        elif average is not None:
            algo.load_state_dict(average.weights)
        test = evaluate(algo, test_split, ev.n_way, ev.n_shot, ev.n_query, cfg.eval.n_episodes, cfg.eval.seed + 1,
                        cfg.eval.chunk, runtime)
        wall = wall_before + time.time() - t_start
        results = {
            "test/acc": test["acc"], "test/ci95": test["ci95"], "test/n_episodes": test["n_episodes"],
            "test/split": cfg.eval.split, "val/best_acc": best_acc if validate else None,
            "train/split": train_on, "best_step": best_step, "steps": step,
            "n_way": ev.n_way, "n_shot": ev.n_shot, "n_query": ev.n_query, "wall_time_s": wall,
            "checkpoint": str(best_path if best_path.exists() else ckpt_dir / "last.pt"),
            "precision": runtime.precision, "package_version": __version__,
        }
        logger.log_metrics({"test/acc": test["acc"], "test/ci95": test["ci95"]}, step)
        curves = save_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        if curves:
            logger.log_image(curves, "curves")
        _write_json(results_path, results)
    except Interrupted as e:
        for m in _close(logger):
            _say(m)
        _say(f"{e}; {_resume_hint(run_dir)}", err=True)
        raise SystemExit(130 if stop.signum == signal.SIGINT else 143) from None
    except BaseException:
        for m in _close(logger):
            _say(m)
        raise

    messages = _close(logger)
    console.print(results_table(
        f"{cfg.data._target_.rsplit('.', 1)[-1]} {ev.n_way}-way {ev.n_shot}-shot: {cfg.algo._target_.rsplit('.', 1)[-1]}",
        [("test acc", f"{100 * test['acc']:.2f} % ± {100 * test['ci95']:.2f}"),
         ("test episodes", str(test["n_episodes"])),
         ("best val acc", f"{100 * best_acc:.2f} % (step {best_step})" if validate
          else f"none: trained on {train_on}, the last model (step {best_step}) kept"),
         ("steps", str(step)), ("wall time", f"{wall:.0f} s"), ("run dir", str(run_dir))]))
    for m in messages:
        _say(m)
    if stop:
        _say(f"{stop.name} arrived during the final test; the run completed anyway")
    return results


# ----------------------------------------------------------------------------- eval
def with_device(saved: DictConfig, device: DictConfig) -> DictConfig:
    """A saved (resolved) run config set to run on ``device``: its ``device`` node is replaced, and so is
    every backbone/algo key that was an interpolation of a device key (``backbone.fused_ops``,
    ``algo.batch_tasks``: same name), so ``fewshot eval ... device.fused_ops=off`` takes effect."""
    saved = saved.copy()
    saved.device = OmegaConf.create(OmegaConf.to_container(device, resolve=True))
    for group in ("backbone", "algo"):
        node = saved.get(group)
        for key in list(node.keys()) if node is not None else []:
            if key in saved.device and key != "_target_":
                node[key] = saved.device[key]
    return saved


def check_eval_run_dir(run_dir: Path) -> None:
    """`fewshot eval` writes results.json and a fresh metrics.jsonl: refuse a folder holding a run's."""
    held = [f for f in ("results.json", "metrics.jsonl", "checkpoints/last.pt") if (Path(run_dir) / f).exists()]
    if held:
        raise UserError(f"{run_dir} already holds a run ({held[0]}); give `fewshot eval` a new hydra.run.dir "
                        f"(its default is a fresh outputs/eval/<date>/<time>)")


@contextmanager
def _built_from(path: str | Path, state: dict):
    """Building a checkpoint's saved config: a setting this version's classes do not take (a checkpoint
    of another fewshot version, or of a build with an option since removed) is one CheckpointError."""
    from hydra.errors import InstantiationException

    try:
        yield
    except InstantiationException as e:  # Hydra's wrapper of the target's own error
        if not isinstance(e.__cause__, TypeError):  # not a signature mismatch: not this error
            raise
        why = str(e.__cause__).splitlines()[0][:160] if str(e.__cause__) else "TypeError"
        raise CheckpointError(f"checkpoint {path} holds settings this fewshot ({__version__}) cannot build "
                              f"({why}); it was written by fewshot {state.get('package_version', '?')} "
                              f"with other options: evaluate it with the version (commit) that wrote it") from None


def evaluate_checkpoint(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Re-test a saved model on ``cfg.eval.n_episodes`` episodes of ``cfg.eval.split``."""
    state = ckpt.load_checkpoint(cfg.checkpoint)
    ckpt.check_targets(state, cfg.checkpoint)  # its config is instantiated below
    run_dir = _run_dir(run_dir)
    check_eval_run_dir(run_dir)
    saved = with_device(OmegaConf.create(state["config"]), cfg.device)
    for k in ("n_way", "n_shot", "n_query", "root"):
        v = cfg.data.get(k)
        if v is not None:
            OmegaConf.update(saved, f"data.{k}", v, force_add=True)
    for k in ("eval_inner_steps", "inner_lr"):
        v = (cfg.get("algo") or {}).get(k)
        if v is not None:
            if k not in saved.algo:
                raise UserError(f"algo.{k}={v}: the checkpoint's learner ({saved.algo._target_.rsplit('.', 1)[-1]}) "
                                  f"has no {k}; leave it out")
            OmegaConf.update(saved, f"algo.{k}", v)
    runtime = _run_runtime(cfg.device)
    with _built_from(cfg.checkpoint, state):
        dataset = build_dataset(saved.data)
    tr, ev = episode_shapes(saved.data)
    split = dataset.split(cfg.eval.split)
    check_episode_shape(split, ev.n_way, ev.n_shot, ev.n_query)
    train_n_way = state["config"]["data"].get("train_n_way") or state["config"]["data"]["n_way"]
    with _built_from(cfg.checkpoint, state):
        algo = build_learner(saved, dataset.x_shape, train_n_way, runtime)
    try:
        algo.load_state_dict(eval_weights(state))
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {cfg.checkpoint} does not match its own config's model "
                              f"({str(e).splitlines()[0]}); it may come from another version of fewshot") from None
    algo.check_n_way(ev.n_way)
    test = evaluate(algo, split, ev.n_way, ev.n_shot, ev.n_query, cfg.eval.n_episodes, cfg.eval.seed + 1,
                    cfg.eval.chunk, runtime)
    results = {"test/acc": test["acc"], "test/ci95": test["ci95"], "test/n_episodes": test["n_episodes"],
               "test/split": cfg.eval.split, "n_way": ev.n_way, "n_shot": ev.n_shot, "n_query": ev.n_query,
               **{f"algo/{k}": saved.algo[k] for k in ("eval_inner_steps", "inner_lr") if k in saved.algo},
               "checkpoint": str(cfg.checkpoint), "step": int(state["step"]), "precision": runtime.precision}
    _write_json(run_dir / "results.json", results)
    messages = _log_eval(cfg, run_dir, saved, results)
    console.print(results_table(
        f"eval {Path(cfg.checkpoint).name}: {ev.n_way}-way {ev.n_shot}-shot, {cfg.eval.split}",
        [("acc", f"{100 * test['acc']:.2f} % ± {100 * test['ci95']:.2f}"), ("episodes", str(test["n_episodes"])),
         ("run dir", str(run_dir))]))
    for m in messages:
        _say(m)
    return results


def _log_eval(cfg: DictConfig, run_dir: Path, saved: DictConfig, results: dict[str, Any]) -> list[str]:
    """``logger=`` for ``fewshot eval`` (default none: metrics.jsonl only): the eval settings and the
    checkpoint's training config as parameters, the results as metrics at the checkpoint's step."""
    logger = _make_logger(cfg.logger, run_dir, truncate_after_step=0)  # a fresh run dir (evaluate_checkpoint)
    try:
        logger.log_params({"eval": OmegaConf.to_container(cfg, resolve=True),
                           "trained": OmegaConf.to_container(saved, resolve=True)})
        logger.log_metrics({k: v for k, v in results.items() if k in ("test/acc", "test/ci95", "test/n_episodes")},
                           results["step"])
        logger.log_other("checkpoint", results["checkpoint"])
    finally:
        messages = _close(logger)
    return messages
