"""Evaluation on fixed episodes: mean accuracy and 95 % confidence interval."""

from __future__ import annotations

import math

import torch

from fewshot_runner.data.base import ClassSplit
from fewshot_runner.data.sampler import fixed_episodes
from fewshot_runner.engine.device import Runtime


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95 % interval: 1.96 * std / sqrt(n) (as in the papers)."""
    v = values.double()
    n = v.numel()
    if n < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), 1.96 * float(v.std(unbiased=True)) / math.sqrt(n)


# Images per forward at evaluation: the episodes of a sampled block go through the learner in groups of at
# most this many images (and at most eval.chunk episodes).  A block of 50 20-way episodes at once (6,000
# images, 1.2 GB per first-layer map) ran 3-5x slower on a 2-core CPU than groups of up to 2,400 images
# (README, Results).  Neither bound changes the episodes (fixed_episodes draws them in blocks of its own),
# and no learner's prediction couples the tasks of a batch, so neither changes a result.
EVAL_IMAGES_PER_FORWARD = 2048


def evaluate(algo, split: ClassSplit, n_way: int, n_shot: int, n_query: int, n_episodes: int, seed: int,
             chunk: int, runtime: Runtime, transform=None) -> dict[str, float]:
    """Accuracy of ``algo`` on ``n_episodes`` episodes fixed by ``seed``, evaluated at most ``chunk`` at a
    time (speed and memory only); restores train mode.  ``transform``: the data set's evaluation
    transform (data/transforms.py; never random), applied to the inputs on the device."""
    was_training = algo.training
    algo.eval()
    accs = []
    try:
        with torch.no_grad():
            for block in fixed_episodes(split, n_way, n_shot, n_query, n_episodes, seed):
                block = block.to(runtime.device)  # one copy per block; the groups are views of it
                if transform is not None:
                    block = block.map_inputs(transform)
                per_task = block.support_y.shape[1] + block.query_y.shape[1]
                step = max(1, min(chunk, EVAL_IMAGES_PER_FORWARD // per_task))
                for start in range(0, block.n_tasks, step):
                    eps = block.tasks(start, start + step)
                    with runtime.autocast():
                        logits = algo.predict(eps)
                    accs.append((logits.argmax(-1) == eps.query_y).float().mean(-1).cpu())
    finally:
        algo.train(was_training)
    acc = torch.cat(accs)
    mean, ci = mean_ci95(acc)
    return {"acc": mean, "ci95": ci, "n_episodes": int(acc.numel())}
