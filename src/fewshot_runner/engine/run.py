"""``train(cfg)`` and ``evaluate_checkpoint(cfg)``: plain functions that return their metrics.

The Hydra entry points in :mod:`fewshot_runner.cli` only wrap these, so tests call them with
a config from ``compose(...)``.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fewshot_runner import __version__
from fewshot_runner.data.base import EpisodicDataset
from fewshot_runner.data.sampler import EpisodeSampler, check_episode_shape
from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.engine.console import console, progress_bar, results_table
from fewshot_runner.engine.device import Runtime, resolve_runtime
from fewshot_runner.engine.evaluate import evaluate
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError

EPISODE_KEYS = ("n_way", "n_shot", "n_query", "train_n_way", "train_n_shot", "train_n_query")


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
        algo = algo.to(memory_format=torch.channels_last)
    return algo


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- outer steps
def gradient_outer_step(algo, optimizer, episodes: Episode, runtime: Runtime, task_chunk: int | None,
                        grad_clip: float | None) -> dict[str, float]:
    """Zero grads, accumulate the meta-gradient over task chunks, step.

    Returns the metrics averaged over tasks.  A non-finite loss skips the update and is
    reported by the caller (metrics["loss"] is then nan/inf).
    """
    optimizer.zero_grad(set_to_none=True)
    n = episodes.n_tasks
    chunk = task_chunk or n
    sums: dict[str, float] = {}
    for s in range(0, n, chunk):
        part = episodes.tasks(s, min(s + chunk, n))
        with runtime.autocast():
            loss, metrics = algo.meta_loss(part)
        w = part.n_tasks / n
        if torch.isfinite(loss):
            (loss * w).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
    if math.isfinite(sums["loss"]):
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(algo.parameters(), grad_clip)
        optimizer.step()
    return sums


# ----------------------------------------------------------------------------- signals
class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

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


# ----------------------------------------------------------------------------- train
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


def _write_json(path: Path, obj: dict) -> None:
    ckpt.atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train, keep the best model on validation episodes, test it; return the results dict."""
    from fewshot_runner.loggers import make_logger
    from fewshot_runner.plots import save_curves

    t_start = time.time()
    run_dir = _run_dir(run_dir)
    results_path = run_dir / "results.json"
    if cfg.resume == "auto" and results_path.exists():
        console.print(f"[green]done already:[/] {results_path} exists (resume=auto); skipping")
        return json.loads(results_path.read_text())

    runtime = resolve_runtime(cfg.device)
    resume_path = _resolve_resume(cfg.resume, run_dir)
    state = ckpt.load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        _check_same_run(state["config"], cfg, resume_path)

    dataset = build_dataset(cfg.data)
    tr, ev = episode_shapes(cfg.data)
    train_split, val_split, test_split = dataset.split("train"), dataset.split("val"), dataset.split(cfg.eval.split)
    check_episode_shape(train_split, tr.n_way, tr.n_shot, tr.n_query)
    check_episode_shape(val_split, ev.n_way, ev.n_shot, ev.n_query)
    check_episode_shape(test_split, ev.n_way, ev.n_shot, ev.n_query)

    torch.manual_seed(cfg.seed)
    algo = build_learner(cfg, dataset.x_shape, tr.n_way, runtime)
    algo.check_n_way(ev.n_way)
    optimizer = torch.optim.Adam(algo.parameters(), lr=cfg.train.outer_lr)
    scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, cfg.train.lr_decay_every, cfg.train.lr_decay)
                 if cfg.train.lr_decay_every else None)
    sampler = EpisodeSampler(train_split, tr.n_way, tr.n_shot, tr.n_query, seed=cfg.seed + 1)
    outer_step = getattr(algo, "outer_step", None)

    start_step, best_acc, best_step, wall_before = 0, -1.0, -1, 0.0
    window: dict[str, list[float]] = {}
    if state is not None:
        algo.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        start_step = int(state["step"])
        best_acc, best_step = float(state["best_val_acc"]), int(state["best_step"])
        window = {k: list(v) for k, v in state.get("log_window", {}).items()}
        wall_before = float(state.get("wall_time", 0.0))
        console.print(f"resuming from {resume_path} at step {start_step}")

    config_plain = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger = make_logger(cfg.logger.kind, run_dir, project_name=cfg.logger.get("project_name"),
                         workspace=cfg.logger.get("workspace"), experiment_name=cfg.logger.get("experiment_name"),
                         tags=list(cfg.logger.get("tags") or []), truncate_after_step=start_step if state else None)
    logger.log_params(config_plain)
    commit = git_commit()
    if commit:
        logger.log_other("git_commit", commit)

    ckpt_dir = run_dir / "checkpoints"

    def snapshot(step: int) -> dict[str, Any]:
        return {
            "config": config_plain, "step": step, "model": algo.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "sampler": sampler.state_dict(), "rng": ckpt.rng_state(), "best_val_acc": best_acc,
            "best_step": best_step, "log_window": window, "wall_time": wall_before + time.time() - t_start,
        }

    stop = StopFlag()
    step = start_step
    messages: list[str] = []
    algo.train()
    try:
        with stop.installed(), progress_bar(cfg.train.progress) as bar:
            task = bar.add_task("train", total=cfg.train.steps, completed=start_step, stats="")
            t_last, s_last = time.time(), start_step
            while step < cfg.train.steps:
                episodes = sampler.sample(cfg.train.meta_batch_size).to(runtime.device, non_blocking=True)
                if outer_step is not None:
                    metrics = outer_step(episodes, optimizer)
                else:
                    metrics = gradient_outer_step(algo, optimizer, episodes, runtime, cfg.train.task_chunk,
                                                  cfg.train.grad_clip)
                step += 1
                if not math.isfinite(metrics["loss"]):
                    msg = (f"the training loss became {metrics['loss']} at step {step}; the learning rate is likely "
                           f"too high (train.outer_lr={cfg.train.outer_lr}"
                           + (f", algo.inner_lr={cfg.algo.inner_lr}" if "inner_lr" in cfg.algo else "") + ")")
                    if cfg.train.on_nan == "stop":
                        good = ckpt_dir / "last.pt"
                        raise NumericalError(msg + (f"; the last good checkpoint is {good}" if good.exists() else "")
                                             + "; lower it, or set train.on_nan=skip")
                    console.print(f"[yellow]warning:[/] {msg}; update skipped (train.on_nan=skip)")
                    logger.log_metrics({"train/skipped_nan": 1.0}, step)
                if scheduler is not None:
                    scheduler.step()
                for k, v in metrics.items():
                    if math.isfinite(v):
                        window.setdefault(k, []).append(v)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    now = time.time()
                    sps = (step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, step
                    logged = {f"train/{k}": sum(v) / len(v) for k, v in window.items() if v}
                    logged["train/lr"] = optimizer.param_groups[0]["lr"]
                    window = {}
                    logger.log_metrics(logged, step)
                    bar.update(task, completed=step, stats=f"loss {logged.get('train/loss', float('nan')):.3f} "
                                                           f"acc {logged.get('train/acc', float('nan')):.3f} {sps:.2f} it/s")
                if step % cfg.train.val_every == 0 or step == cfg.train.steps:
                    val = evaluate(algo, val_split, ev.n_way, ev.n_shot, ev.n_query, cfg.train.val_episodes,
                                   cfg.eval.seed, cfg.eval.chunk, runtime)
                    improved = val["acc"] > best_acc
                    if improved:
                        best_acc, best_step = val["acc"], step
                    logger.log_metrics({"val/acc": val["acc"], "val/ci95": val["ci95"], "val/best_acc": best_acc}, step)
                    if improved:
                        ckpt.save_checkpoint(ckpt_dir / "best.pt", snapshot(step))
                if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
                    ckpt.save_checkpoint(ckpt_dir / "last.pt", snapshot(step))
                if stop:
                    ckpt.save_checkpoint(ckpt_dir / "last.pt", snapshot(step))
                    raise Interrupted(f"stopped by signal {stop.signum} at step {step}; checkpoint "
                                      f"{ckpt_dir / 'last.pt'}")
    except Interrupted as e:
        for m in logger.close():
            console.print(m)
        console.print(f"[yellow]{e}[/]; resume with: fewshot train <same overrides> "
                      f"hydra.run.dir={run_dir} resume=auto")
        raise SystemExit(130 if stop.signum == signal.SIGINT else 143)
    except BaseException:
        messages = logger.close()
        for m in messages:
            console.print(m)
        raise

    # --- test the best model
    best_path = ckpt_dir / "best.pt"
    if best_path.exists():
        algo.load_state_dict(ckpt.load_checkpoint(best_path)["model"])
    test = evaluate(algo, test_split, ev.n_way, ev.n_shot, ev.n_query, cfg.eval.n_episodes, cfg.eval.seed + 1,
                    cfg.eval.chunk, runtime)
    wall = wall_before + time.time() - t_start
    results = {
        "test/acc": test["acc"], "test/ci95": test["ci95"], "test/n_episodes": test["n_episodes"],
        "test/split": cfg.eval.split, "val/best_acc": best_acc, "best_step": best_step, "steps": step,
        "n_way": ev.n_way, "n_shot": ev.n_shot, "n_query": ev.n_query, "wall_time_s": wall,
        "checkpoint": str(best_path if best_path.exists() else ckpt_dir / "last.pt"),
        "package_version": __version__,
    }
    logger.log_metrics({"test/acc": test["acc"], "test/ci95": test["ci95"]}, step)
    curves = save_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    if curves:
        logger.log_image(curves, "curves")
    _write_json(results_path, results)
    messages = logger.close()
    console.print(results_table(
        f"{cfg.data._target_.rsplit('.', 1)[-1]} {ev.n_way}-way {ev.n_shot}-shot: {cfg.algo._target_.rsplit('.', 1)[-1]}",
        [("test acc", f"{100 * test['acc']:.2f} % ± {100 * test['ci95']:.2f}"),
         ("test episodes", str(test["n_episodes"])), ("best val acc", f"{100 * best_acc:.2f} % (step {best_step})"),
         ("steps", str(step)), ("wall time", f"{wall:.0f} s"), ("run dir", str(run_dir))]))
    for m in messages:
        console.print(m)
    return results


def _check_same_run(saved: dict, cfg: DictConfig, path: Path) -> None:
    """A resumed run must be the same model and algorithm."""
    now = OmegaConf.to_container(cfg, resolve=True)
    for key in ("algo", "backbone"):
        if saved.get(key, {}).get("_target_") != now[key].get("_target_"):
            raise UserError(f"checkpoint {path} was trained with {key} {saved.get(key, {}).get('_target_')}, "
                            f"not {now[key].get('_target_')}; resume with the same {key}= as the original run")
    if saved["data"].get("n_way") != now["data"].get("n_way") and "MAML" in str(now["algo"].get("_target_")):
        raise UserError(f"checkpoint {path} has a {saved['data'].get('n_way')}-way head; resume with "
                        f"data.n_way={saved['data'].get('n_way')}")


# ----------------------------------------------------------------------------- eval
def evaluate_checkpoint(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Re-test a saved model on ``cfg.eval.n_episodes`` episodes of ``cfg.eval.split``."""
    run_dir = _run_dir(run_dir)
    state = ckpt.load_checkpoint(cfg.checkpoint)
    saved = OmegaConf.create(state["config"])
    for k in ("n_way", "n_shot", "n_query", "root"):
        v = cfg.data.get(k)
        if v is not None:
            OmegaConf.update(saved, f"data.{k}", v, force_add=True)
    runtime = resolve_runtime(cfg.device)
    dataset = build_dataset(saved.data)
    tr, ev = episode_shapes(saved.data)
    split = dataset.split(cfg.eval.split)
    check_episode_shape(split, ev.n_way, ev.n_shot, ev.n_query)
    train_n_way = state["config"]["data"].get("train_n_way") or state["config"]["data"]["n_way"]
    algo = build_learner(saved, dataset.x_shape, train_n_way, runtime)
    try:
        algo.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {cfg.checkpoint} does not match its own config's model "
                        f"({str(e).splitlines()[0]}); it may come from another version of fewshot") from e
    algo.check_n_way(ev.n_way)
    test = evaluate(algo, split, ev.n_way, ev.n_shot, ev.n_query, cfg.eval.n_episodes, cfg.eval.seed + 1,
                    cfg.eval.chunk, runtime)
    results = {"test/acc": test["acc"], "test/ci95": test["ci95"], "test/n_episodes": test["n_episodes"],
               "test/split": cfg.eval.split, "n_way": ev.n_way, "n_shot": ev.n_shot, "n_query": ev.n_query,
               "checkpoint": str(cfg.checkpoint), "step": int(state["step"])}
    _write_json(run_dir / "results.json", results)
    console.print(results_table(
        f"eval {Path(cfg.checkpoint).name}: {ev.n_way}-way {ev.n_shot}-shot, {cfg.eval.split}",
        [("acc", f"{100 * test['acc']:.2f} % ± {100 * test['ci95']:.2f}"), ("episodes", str(test["n_episodes"])),
         ("run dir", str(run_dir))]))
    return results
