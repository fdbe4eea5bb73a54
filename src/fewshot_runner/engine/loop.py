"""The training loop: one :class:`TrainingRun` holds what a run carries from step to step (the parts
built by :mod:`fewshot_runner.engine.run`, the step, the best validation score, the logging window) and
steps it: draw a batch, the outer update, log, validate, checkpoint, stop on a signal.

It knows no learner: it calls the hooks declared in :mod:`fewshot_runner.algorithms.base` only.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from fewshot_runner.algorithms.base import MetaLearner
from fewshot_runner.data.base import ClassSplit
from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.engine.build import Shape
from fewshot_runner.engine.console import training_progress
from fewshot_runner.engine.device import Runtime
from fewshot_runner.engine.ema import WeightAverage
from fewshot_runner.engine.evaluate import TASK_METRICS, TaskMetric, evaluate
from fewshot_runner.engine.faults import FaultPlan, poisoned
from fewshot_runner.engine.graphs import GraphedStep
from fewshot_runner.engine.memory import ChunkPlanner
from fewshot_runner.engine.messages import say
from fewshot_runner.engine.outer_step import gradient_outer_step
from fewshot_runner.engine.signals import Interrupted, StopFlag
from fewshot_runner.errors import UserError

STATUS_EVERY_S = 30.0  # plain status lines when no progress bar is drawn


class NumericalError(UserError):
    exit_code = 3


@dataclass
class TrainingRun:
    """A training run's parts and the state it carries between steps (what a checkpoint saves)."""

    cfg: DictConfig
    run_dir: Path
    runtime: Runtime
    algo: MetaLearner
    optimizer: torch.optim.Optimizer
    scheduler: Any
    average: WeightAverage | None
    source: Any  # the learner's batch source (sample / state_dict / load_state_dict)
    val_split: ClassSplit | None
    eval_shape: Shape
    train_transform: Any
    eval_transform: Any
    planner: ChunkPlanner | None
    graphed: GraphedStep | None
    logger: Any
    faults: FaultPlan
    stop: StopFlag
    config_plain: dict
    t_start: float
    step: int = 0
    best_acc: float = -1.0  # the best validation score of ``metric`` (regression: lowest MSE), as best_val_acc
    best_step: int = -1
    wall_before: float = 0.0
    saved_at: int = -1
    window: dict[str, list[float]] = field(default_factory=dict)
    resume_state: dict | None = None  # the checkpoint resumed from, until its RNG state is restored
    resume_path: Path | None = None
    metric: TaskMetric = TASK_METRICS["classification"]  # how validation scores (the val split's task kind)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def validate(self) -> bool:
        return self.val_split is not None

    def wall_time(self) -> float:
        return self.wall_before + time.time() - self.t_start

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self) -> dict[str, Any]:
        planner = self.planner
        return {
            "config": self.config_plain, "step": self.step, "model": self.algo.state_dict(),
            "ema": self.average.state_dict() if self.average is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "sampler": self.source.state_dict(), "rng": ckpt.rng_state(), "best_val_acc": self.best_acc,
            "best_step": self.best_step, "log_window": self.window, "wall_time": self.wall_time(),
            "chunk_plan": {"cap_mb": planner.cap_mb, "chunk": planner.chunk} if planner is not None else None,
        }

    def save(self, name: str) -> None:
        """Write ``checkpoints/<name>`` atomically; never with non-finite weights."""
        if not all(bool(torch.isfinite(p).all()) for p in self.algo.parameters()):
            raise NumericalError(f"the model's weights became non-finite by step {self.step}; the learning rate is "
                                 f"likely too high (train.outer_lr={self.cfg.train.outer_lr}); {self.ckpt_dir / name} "
                                 f"was kept as it was; lower the learning rate or set train.grad_clip")
        hook = self.faults.on_write("best" if name == "best.pt" else "ckpt", self.step)
        ckpt.save_checkpoint(self.ckpt_dir / name, self.snapshot(), before_commit=hook)

    # ------------------------------------------------------------------ one step
    def next_batch(self):
        batch = self.source.sample(self.cfg.train.meta_batch_size)
        if self.runtime.device.type == "cuda":  # page-locked, so the copy below is asynchronous
            batch = batch.pin_memory()
        batch = batch.to(self.runtime.device, non_blocking=True)
        if self.train_transform is not None:
            batch = batch.map_inputs(self.train_transform)
        if self.faults.poison(self.step + 1):
            batch = poisoned(batch)
        return batch

    def outer_update(self, batch) -> dict[str, float]:
        cfg, algo = self.cfg, self.algo
        algo.set_progress(self.step, cfg.train.steps)
        if algo.has_own_outer_step():
            return algo.outer_step(batch, self.optimizer)
        try:
            metrics = gradient_outer_step(algo, self.optimizer, batch, self.runtime, cfg.train.task_chunk,
                                          cfg.train.grad_clip, self.planner, self.graphed)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of GPU memory in training step {self.step + 1} (train.meta_batch_size="
                            f"{cfg.train.meta_batch_size}); set device.memory_cap_mb (MiB, e.g. half the GPU's memory) "
                            f"to split each batch into chunks that fit, or train.task_chunk=N; then resume=auto (the "
                            f"last checkpoint is kept)") from None
        if self.graphed is not None and self.graphed.failed:
            say(f"warning: {self.graphed.failed}; going on without CUDA graphs (device.cuda_graphs=off)")
            self.graphed = None
        if self.planner is not None:
            for msg in self.planner.messages:
                say(msg)
                self.logger.log_other("task_chunk", self.planner.chunk)
            self.planner.messages.clear()
        return metrics

    def non_finite(self, metrics: dict[str, float], kept_buffers: list[torch.Tensor]) -> None:
        """A non-finite loss: stop (``train.on_nan=stop``, the last checkpoint kept) or skip the update."""
        cfg = self.cfg
        rates = ", ".join(f"algo.{k}={v}" for k, v in cfg.algo.items() if k.endswith("lr") and k != "_target_")
        msg = (f"the training loss became {metrics['loss']} at step {self.step}; the learning rate is likely too "
               f"high (train.outer_lr={cfg.train.outer_lr}" + (f", {rates}" if rates else "") + ")")
        if cfg.train.on_nan != "skip":
            good = self.ckpt_dir / "last.pt"
            raise NumericalError(msg + (f"; the last good checkpoint is {good}" if good.exists() else "")
                                 + "; lower it, or set train.on_nan=skip")
        with torch.no_grad():  # the forward pass may have put NaN in batch-norm statistics
            for b, kept in zip(self.algo.buffers(), kept_buffers):
                b.copy_(kept)
        say(f"warning: {msg}; update skipped (train.on_nan=skip)")
        self.logger.log_metrics({"train/skipped_nan": 1.0}, self.step)

    def run_validation(self) -> None:
        cfg, ev = self.cfg, self.eval_shape
        with self.average.applied(self.algo) if self.average is not None else nullcontext():
            val = evaluate(self.algo, self.val_split, ev.n_way, ev.n_shot, ev.n_query, cfg.train.val_episodes,
                           cfg.eval.seed, cfg.eval.chunk, self.runtime, transform=self.eval_transform)
        self.faults.at("val", self.step)
        m = self.metric  # accuracy: the highest is best; a regression's MSE: the lowest
        improved = m.better(val[m.name], self.best_acc)
        if improved:
            self.best_acc, self.best_step = val[m.name], self.step
        self.logger.log_metrics({f"val/{m.name}": val[m.name], "val/ci95": val["ci95"],
                                 f"val/best_{m.name}": self.best_acc}, self.step)
        if improved:
            self.save("best.pt")
        say(f"step {self.step}/{cfg.train.steps}  val {m.name} {m.text(val[m.name], val['ci95'])}  "
            + ("best so far, saved best.pt" if improved
               else f"best {m.value_text(self.best_acc)} at step {self.best_step}"))

    # ------------------------------------------------------------------ the loop
    def loop(self) -> None:
        """Step until ``train.steps``; a signal ends it after the current step with a checkpoint."""
        cfg, algo = self.cfg, self.algo
        skip_nan = cfg.train.on_nan == "skip"
        algo.train()
        # In a terminal a bar; where it is not drawn (a pipe, a SLURM log, train.progress=false), plain
        # status lines, at most one every STATUS_EVERY_S seconds and at the last step (engine/console.py).
        with training_progress(cfg.train.steps, start=self.step, enabled=cfg.train.progress,
                               elapsed_before=self.wall_before, status_every_s=STATUS_EVERY_S) as progress:
            while self.step < cfg.train.steps:
                batch = self.next_batch()
                buffers = [b.detach().clone() for b in algo.buffers()] if skip_nan else []
                metrics = self.outer_update(batch)
                self.step += 1
                step = self.step
                self.faults.at("step", step)
                if not math.isfinite(metrics["loss"]):
                    self.non_finite(metrics, buffers)
                if self.average is not None and math.isfinite(metrics["loss"]):
                    self.average.update(algo)
                if self.scheduler is not None:
                    self.scheduler.step()
                for k, v in metrics.items():
                    v = float(v)
                    if math.isfinite(v):
                        self.window.setdefault(k, []).append(v)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    logged = {f"train/{k}": sum(v) / len(v) for k, v in self.window.items() if v}
                    logged["train/lr"] = self.optimizer.param_groups[0]["lr"]
                    self.window.clear()
                    self.logger.log_metrics(logged, step)
                    progress.update(step, logged, lr=logged["train/lr"],
                                    best_val=self.best_acc if self.validate else None, best_val_name=self.metric.name)
                if self.validate and (step % cfg.train.val_every == 0 or step == cfg.train.steps):
                    self.run_validation()
                if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
                    self.save("last.pt")
                    self.saved_at = step
                if not self.validate and step == cfg.train.steps:  # the model kept is the last one
                    self.best_step = step
                    self.save("best.pt")
                if self.stop:
                    if self.saved_at != step:
                        self.save("last.pt")
                    raise Interrupted(f"stopped by {self.stop.name} after step {step}; checkpoint "
                                      f"{self.ckpt_dir / 'last.pt'}")
