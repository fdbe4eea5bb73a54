"""The pictures a run leaves in its run dir (and logs), at the end of training and by ``fewshot eval``.

:func:`save_pictures` is the one place the engine asks for them; what a picture shows depends on the
task kind of the tested split (``split.task_kind``):

* ``"classification"``: an **episode picture** (a test episode's support images and its queries with
  predicted and true labels, wrong ones marked) for every classifier, and an **embedding picture**
  (a 2-D PCA projection of a few test episodes' support, query and prototype embeddings) for learners
  whose :meth:`~fewshot_runner.algorithms.base.MetaLearner.embed_episode` gives embeddings;
* ``"regression"``: the adapted function against the truth after 0, 1 and 10 inner steps (sinusoid).

Each maker returns the paths it wrote; a picture that cannot be drawn (no matplotlib) is skipped with
no error: pictures never fail a run whose numbers are written.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Any

# maker(algo, split, shape, runtime, transform, out_dir, seed) -> list of (path, name)
PictureMaker = Callable[..., list[tuple[Path, str]]]


def save_pictures(algo, split, shape, runtime, transform, out_dir: Path, seed: int, logger: Any = None
                  ) -> list[tuple[Path, str]]:
    """Every picture for ``split``'s task kind, written under ``out_dir`` and, with a ``logger``, logged as
    images; returns (path, name) of each.  ``shape``: the evaluation episode shape (n_way, n_shot,
    n_query); ``seed``: fixes which test episodes are drawn."""
    kind = split.task_kind
    out: list[tuple[Path, str]] = []
    was_training = algo.training
    algo.eval()
    try:
        for make in makers(kind):
            out.extend(make(algo, split, shape, runtime, transform, Path(out_dir), seed))
    finally:
        algo.train(was_training)
    if logger is not None:
        for path, name in out:
            logger.log_image(path, name)
    return out


def makers(kind: str) -> list[PictureMaker]:
    """The picture makers of a task kind (imported here, not at the engine's import: matplotlib)."""
    if kind == "regression":
        from fewshot_runner.plots_regression import regression_picture

        return [regression_picture]
    from fewshot_runner.plots_episodes import embedding_picture, episode_picture

    return [episode_picture, embedding_picture]
