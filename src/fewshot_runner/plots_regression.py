"""Pictures of regression tasks (engine/pictures.py calls them):
the adapted function against the truth after 0, 1 and 10 inner steps (sinusoid), as in Finn et al.
(2017), figure 2.

For a few test tasks fixed by the seed, the learner adapts to each task's K support points with
:meth:`~fewshot_runner.algorithms.gradient.GradientLearner.adapted_predict` (0 steps: the meta-learned
initialisation) and predicts on a dense grid over the task's input range; one panel per task shows the
true function, the support points and the three predictions, each with its MSE on the grid.  The
drawing (:func:`draw_regression`) takes plain tensors and returns what it drew, so tests can check it.
matplotlib (Agg) is imported only when drawing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from fewshot_runner.episode import Episode

REGRESSION_FILE = "regression.png"
STEPS = (0, 1, 10)  # inner steps drawn (the MAML paper's figure 2)
N_TASKS = 3  # test tasks, one panel each
GRID = 200  # points of the dense grid each prediction is drawn on
COLORS = {0: "#1f77b4", 1: "#ff7f0e", 10: "#2ca02c"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_regression(path: str | Path, grid: torch.Tensor, truth: torch.Tensor, support_x: torch.Tensor,
                    support_y: torch.Tensor, predictions: dict[int, torch.Tensor], title: str = "") -> dict:
    """One panel per task: the truth, the support points and each prediction, against x.

    grid (G,) the x of the curves; truth (T, G); support_x, support_y (T, K); predictions: inner steps ->
    (T, G).  Returns ``{"panels": T, "curves": {steps: mse per task (T,)}, "path": path}`` (the MSE of each
    prediction against the truth on the grid, as the legends say).
    """
    plt = _pyplot()
    n = truth.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    g = grid.detach().cpu().double()
    mses = {}
    try:
        for t, ax in enumerate(axes[0]):
            ax.plot(g, truth[t].cpu().double(), color="black", lw=2, label="truth")
            for steps, pred in predictions.items():
                err = (pred[t].cpu().double() - truth[t].cpu().double()).pow(2).mean()
                mses.setdefault(steps, []).append(float(err))
                ax.plot(g, pred[t].cpu().double(), color=COLORS.get(steps), ls="--" if steps == 0 else "-",
                        label=f"{steps} step{'s' if steps != 1 else ''} (mse {float(err):.3f})")
            ax.scatter(support_x[t].cpu().double(), support_y[t].cpu().double(), color="#d62728", marker="^",
                       zorder=5, label=f"{support_x.shape[1]} support points")
            ax.set_xlabel("x")
            ax.set_title(f"test task {t + 1}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return {"panels": n, "curves": {k: torch.tensor(v) for k, v in mses.items()}, "path": Path(path)}


def regression_picture(algo, split, shape, runtime, transform, out_dir: Path, seed: int) -> list[tuple[Path, str]]:
    """The adapted function against the truth after 0, 1 and 10 inner steps on ``N_TASKS`` test tasks fixed
    by ``seed``.  A picture that cannot be drawn (no matplotlib, a learner that cannot adapt step by step,
    a failure while drawing) is a warning, never an error."""
    try:
        return _regression_picture(algo, split, shape, runtime, transform, Path(out_dir), seed)
    except Exception as e:  # noqa: BLE001 - pictures never fail a run whose numbers are written
        warnings.warn(f"no regression picture ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                      stacklevel=2)
        return []


def adapted_curves(algo, split, n_shot: int, runtime, transform, seed: int, steps=STEPS, n_tasks: int = N_TASKS):
    """(grid (G,), truth (T, G), support_x (T, K), support_y (T, K), {steps: predictions (T, G)}) for the
    first ``n_tasks`` tasks of ``split.episode_sampler(1, n_shot, 1, seed)``."""
    sampler = split.episode_sampler(1, n_shot, 1, seed)
    drawn = sampler.draw(n_tasks)
    tasks = sampler.gather(drawn)
    lo, hi = split.x_range
    grid = torch.linspace(lo, hi, GRID)
    grid_x = grid.view(1, GRID, 1).expand(n_tasks, GRID, 1).contiguous()
    truth = sampler.function(drawn, grid.expand(n_tasks, GRID))
    episodes = Episode(tasks.support_x, tasks.support_y, grid_x, truth, 1).to(runtime.device)
    if transform is not None:
        episodes = episodes.map_inputs(transform)
    predictions = {}
    with torch.no_grad(), runtime.autocast():
        for k in steps:
            predictions[k] = algo.adapted_predict(episodes, k).float().squeeze(-1).cpu()
    return grid, truth, tasks.support_x.squeeze(-1), tasks.support_y, predictions


def _regression_picture(algo, split, shape, runtime, transform, out_dir: Path, seed: int) -> list[tuple[Path, str]]:
    grid, truth, sx, sy, predictions = adapted_curves(algo, split, shape.n_shot, runtime, transform, seed)
    path = out_dir / REGRESSION_FILE
    draw_regression(path, grid, truth, sx, sy, predictions,
                    title=f"{type(algo).__name__}: K={shape.n_shot}, adapted after {', '.join(map(str, STEPS))} steps")
    return [(path, "regression")]
