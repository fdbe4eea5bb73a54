"""The outer step of gradient-based training: zero the gradients, accumulate the meta-gradient over
chunks of tasks (``train.task_chunk``, ``device.memory_cap_mb``), in task threads where the learner
allows it, or replay it as a CUDA graph; clip; step."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from fewshot_runner.engine.device import Runtime
from fewshot_runner.engine.graphs import GraphedStep
from fewshot_runner.engine.memory import MB, ChunkPlanner, chunk_bounds, measure_peak
from fewshot_runner.engine.task_threads import task_threads_for, threaded_backward
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError


def gradient_outer_step(algo, optimizer, episodes: Episode | Any, runtime: Runtime, task_chunk: int | None,
                        grad_clip: float | None, planner: ChunkPlanner | None = None,
                        graphed: GraphedStep | None = None) -> dict[str, float]:
    """Zero grads, accumulate the meta-gradient over task chunks, step.

    The chunks: ``task_chunk`` tasks each (None: the whole batch), or, with a ``planner``
    (``device.memory_cap_mb``), as many as fit under its cap (its first step measures them: 1 task,
    then 2, then the rest).  ``graphed`` (``device.cuda_graphs``, once the chunks are known): the
    forward and backward of every chunk replayed as one CUDA graph.

    ``episodes``: a batch of episodes, or another batch a learner's ``batch_source`` gives (class-labelled
    images, pairs): such a batch is one unit, never split into chunks or threads.

    Returns the metrics averaged over tasks (and ``peak_mem_mb`` where measured).  A non-finite
    loss skips the update and is reported by the caller (metrics["loss"] is then nan/inf).
    """
    n = episodes.n_tasks if isinstance(episodes, Episode) else 1
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
        part = episodes if (s, e) == (0, n) else episodes.tasks(s, e)
        w = (e - s) / n
        with measure_peak(runtime.device) if measure else contextlib.nullcontext([0]) as peak:
            if threads > 1 and not planning_step:  # (the CPU probe counts this thread's saved tensors)
                metrics = threaded_backward(algo, part, runtime, threads, w)
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
    own_step = algo.has_own_outer_step()
    chunk = train_cfg.task_chunk
    splits = "device.memory_cap_mb" if runtime.memory_cap_mb is not None else (
        "train.task_chunk" if chunk and chunk < train_cfg.meta_batch_size else None)
    if splits and (own_step or not algo.independent_tasks):
        raise UserError(f"{splits} splits a meta-batch into chunks of tasks, which changes {type(algo).__name__}'s "
                        f"objective (its tasks share batch norm or its update); set {splits}=null and lower "
                        f"train.meta_batch_size instead")
    planner = ChunkPlanner(runtime.memory_cap_mb) if runtime.memory_cap_mb is not None else None
    graphed = GraphedStep(algo, runtime) if runtime.cuda_graphs and not own_step else None
    return planner, graphed

