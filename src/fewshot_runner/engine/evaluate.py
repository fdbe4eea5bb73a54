"""Evaluation on fixed episodes: the mean of a per-task score (accuracy, or the MSE of a regression
task) and its 95 % confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fewshot_runner.data.base import ClassSplit
from fewshot_runner.data.sampler import fixed_episodes
from fewshot_runner.engine.device import Runtime
from fewshot_runner.errors import UserError


@dataclass(frozen=True)
class TaskMetric:
    """How the tasks of a kind (``split.task_kind``) are scored: ``name`` (the metric keys ``val/<name>``,
    ``val/best_<name>``, ``test/<name>``), ``per_task(outputs (T, Q, n_out), targets (T, Q)) -> (T,)``,
    which way is better, the worst value (where the best validation score starts) and how a value reads."""

    name: str
    per_task: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool
    worst: float
    percent: bool  # shown as a percentage (accuracy)
    shape: str  # how an episode shape reads in titles: a format of n_way and n_shot

    def shape_text(self, n_way: int, n_shot: int) -> str:
        return self.shape.format(n_way=n_way, n_shot=n_shot)

    def better(self, value: float, best: float) -> bool:
        return value > best if self.higher_is_better else value < best

    def value_text(self, value: float) -> str:
        return f"{100 * value:.2f} %" if self.percent else f"{value:.4f}"

    def text(self, mean: float, ci95: float) -> str:
        """``87.30 % ± 0.20`` (accuracy) or ``0.1234 ± 0.0100`` (MSE)."""
        return (f"{100 * mean:.2f} % ± {100 * ci95:.2f}" if self.percent else f"{mean:.4f} ± {ci95:.4f}")


def per_task_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fraction of each task's queries classified right: logits (T, Q, n_way), labels (T, Q) -> (T,)."""
    return (logits.argmax(-1) == labels).float().mean(-1)


def per_task_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each task's mean squared error over its query points: outputs (T, Q, 1), targets (T, Q) -> (T,)."""
    return (outputs.squeeze(-1) - targets).pow(2).mean(-1)


TASK_METRICS = {"classification": TaskMetric("acc", per_task_accuracy, True, -1.0, True, "{n_way}-way {n_shot}-shot"),
                "regression": TaskMetric("mse", per_task_mse, False, math.inf, False, "K={n_shot} regression")}


def task_metric(kind: str) -> TaskMetric:
    """The :class:`TaskMetric` of a task kind (``split.task_kind``)."""
    if kind not in TASK_METRICS:
        raise UserError(f"a data set whose splits say task_kind={kind!r}: the engine scores only "
                        f"{', '.join(TASK_METRICS)} tasks; give its splits one of those")
    return TASK_METRICS[kind]


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
# and no learner's prediction couples the tasks of a batch, so neither changes a result.  The bound is for
# images of up to 28 x 28 pixels and shrinks with larger ones in proportion to their pixels (84 x 84: 227
# images, 1 GB per 64-channel map): 2,048 images of 84 x 84 took 17 GB, and the kernel killed the run.
EVAL_IMAGES_PER_FORWARD = 2048
EVAL_REFERENCE_PIXELS = 28 * 28


def images_per_forward(x: torch.Tensor) -> int:
    """The evaluation bound for images like ``x`` (..., H, W) (vectors: the plain bound)."""
    pixels = x.shape[-2] * x.shape[-1] if x.dim() >= 4 else 1
    return max(1, EVAL_IMAGES_PER_FORWARD * EVAL_REFERENCE_PIXELS // max(pixels, EVAL_REFERENCE_PIXELS))


def evaluate(algo, split: ClassSplit, n_way: int, n_shot: int, n_query: int, n_episodes: int, seed: int,
             chunk: int, runtime: Runtime, transform=None) -> dict[str, float]:
    """Accuracy of ``algo`` on ``n_episodes`` episodes fixed by ``seed``, evaluated at most ``chunk`` at a
    time (speed and memory only); restores train mode.  ``transform``: the data set's evaluation
    transform (data/transforms.py; never random), applied to the inputs on the device.

    Returns ``{name: mean, "ci95": half-width, "n_episodes": n}`` with the name of the split's
    :class:`TaskMetric`: ``"acc"``, or ``"mse"`` for a regression split (the mean of the per-task MSE).
    """
    metric = task_metric(split.task_kind)
    was_training = algo.training
    algo.eval()
    accs = []
    try:
        with torch.no_grad():
            for block in fixed_episodes(split, n_way, n_shot, n_query, n_episodes, seed):  # (any split)
                block = block.to(runtime.device)  # one copy per block; the groups are views of it
                if transform is not None:
                    block = block.map_inputs(transform)
                per_task = block.support_y.shape[1] + block.query_y.shape[1]
                step = max(1, min(chunk, images_per_forward(block.support_x) // per_task))
                for start in range(0, block.n_tasks, step):
                    eps = block.tasks(start, start + step)
                    with runtime.autocast():
                        logits = algo.predict(eps)
                    accs.append(metric.per_task(logits, eps.query_y).cpu())
    finally:
        algo.train(was_training)
    acc = torch.cat(accs)
    mean, ci = mean_ci95(acc)
    out = {metric.name: mean, "ci95": ci, "n_episodes": int(acc.numel())}
    finite = torch.isfinite(acc)
    if not bool(finite.all()):  # the mean stays NaN / inf (honest); the count and the finite tasks' median beside it
        out["n_nonfinite"] = int((~finite).sum())
        out["finite_median"] = float(acc[finite].double().median()) if bool(finite.any()) else float("nan")
    return out


def nonfinite_results(test: dict, name: str) -> dict:
    """results.json keys for a test whose tasks were not all finite (none otherwise)."""
    if not test.get("n_nonfinite"):
        return {}
    return {"test/n_nonfinite": test["n_nonfinite"], f"test/median_finite_{name}": test["finite_median"]}


def nonfinite_note(results: dict, name: str) -> str | None:
    """One line when some test tasks scored NaN or inf (an adaptation that diverged), else None: ``results`` is
    results.json's dict (``test/<name>``, ``test/n_episodes`` and :func:`nonfinite_results`' keys)."""
    bad = results.get("test/n_nonfinite")
    if not bad:
        return None
    n = results["test/n_episodes"]
    return (f"warning: {bad} of {n} test tasks gave a non-finite {name} (the adaptation diverged), so the mean is "
            f"{results[f'test/{name}']}; the median of the {n - bad} finite ones is "
            f"{results[f'test/median_finite_{name}']:.4g}; fewer algo.eval_inner_steps or a smaller inner learning "
            f"rate avoid it")


def learner_measures(algo, split: ClassSplit, n_way: int, per_class: int, n_tasks: int, seed: int, runtime: Runtime,
                     transform=None) -> dict[str, float]:
    """The learner's own test measures (``MetaLearner.test_measures``, e.g. MANN's accuracy per instance) as
    ``{"test/<name>": mean, "test/<name>_ci95": half-width}``; empty for most learners.  Restores train mode."""
    was_training = algo.training
    algo.eval()
    try:
        with torch.no_grad():
            measures = algo.test_measures(split, n_way, per_class, n_tasks, seed, runtime, transform)
    finally:
        algo.train(was_training)
    out: dict[str, float] = {}
    for name, values in measures.items():
        out[f"test/{name}"], out[f"test/{name}_ci95"] = mean_ci95(values)
    return out


def measure_rows(results: dict) -> list[tuple[str, str]]:
    """Results-table rows of the learner's own measures in ``results`` (``test/<name>`` with its ``_ci95``;
    fractions, shown in %)."""
    names = [k for k in results if k.startswith("test/") and f"{k}_ci95" in results and k != "test/ci95"]
    return [(f"test {k[5:]}", f"{100 * results[k]:.2f} % ± {100 * results[k + '_ci95']:.2f}") for k in names]
