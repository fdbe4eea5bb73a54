"""device.task_threads: the tasks of a meta-batch in worker threads of one intra-op thread each (CPU)."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from fewshot_runner.engine.device import Runtime
from fewshot_runner.episode import Episode

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
    (``independent_tasks``), it runs them one by one (``runs_tasks_one_by_one``: not batched), on CPU."""
    if not algo.independent_tasks or runtime.device.type != "cpu" or not isinstance(episodes, Episode):
        return 1
    k = min(runtime.task_threads, episodes.n_tasks)
    if k <= 1:
        return 1
    return k if algo.runs_tasks_one_by_one(episodes) else 1


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


def threaded_backward(algo, part: Episode, runtime: Runtime, k: int, weight: float) -> dict[str, torch.Tensor]:
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

