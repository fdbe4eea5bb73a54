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


def evaluate(algo, split: ClassSplit, n_way: int, n_shot: int, n_query: int, n_episodes: int, seed: int,
             chunk: int, runtime: Runtime) -> dict[str, float]:
    """Accuracy of ``algo`` on ``n_episodes`` episodes fixed by ``seed``; restores train mode."""
    was_training = algo.training
    algo.eval()
    accs = []
    try:
        with torch.no_grad():
            for eps in fixed_episodes(split, n_way, n_shot, n_query, n_episodes, seed, chunk):
                eps = eps.to(runtime.device)
                with runtime.autocast():
                    logits = algo.predict(eps)
                accs.append((logits.argmax(-1) == eps.query_y).float().mean(-1).cpu())
    finally:
        algo.train(was_training)
    acc = torch.cat(accs)
    mean, ci = mean_ci95(acc)
    return {"acc": mean, "ci95": ci, "n_episodes": int(acc.numel())}
