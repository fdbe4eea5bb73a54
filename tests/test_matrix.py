"""Every learner trains on every data set: ``train`` (in-process, as ``fewshot train`` runs it) on a tiny copy
of each published data set in its on-disk format (tests/tiny_copies.py), on the real Omniglot, on
synthetic data and on sinusoid regression, for every ``conf/algo/*.yaml``.

Each run: 2 training steps, one validation, a 4-episode test; images at the data set's real size (84 x 84
for miniImageNet, tieredImageNet and CUB, 32 x 32 for the CIFAR sets, 28 x 28 Omniglot).  Only the
number of inner / fine-tuning steps is cut (``FAST``): those are the run's cost, not what is checked.
A classifier on sinusoid regression must be refused in one line naming the task kind.
"""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import fewshot_runner.config  # noqa: F401  (registers the schemas)
from fewshot_runner.cli import conf_dir
from fewshot_runner.engine.run import train
from fewshot_runner.errors import UserError
from tiny_copies import config_overrides

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CONF = Path(conf_dir())
ALGOS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
TINY_COPIES = ("miniimagenet", "tieredimagenet", "cifar_fs", "fc100", "cub", "image_folder")
# fewer inner / fine-tuning steps: the cost of a run, not what it checks
FAST = {"reptile": ["algo.inner_steps=2", "algo.eval_inner_steps=2"],
        "meta_lstm": ["algo.inner_steps=2", "algo.eval_inner_steps=2"],
        "mamlpp": ["algo.inner_steps=2", "algo.eval_inner_steps=2"],
        "baseline": ["algo.fit_epochs=2"], "baselinepp": ["algo.fit_epochs=2"]}
SHAPE = ["data.n_way=2", "data.n_shot=1", "data.n_query=1", "data.train_n_way=2", "data.train_n_query=1"]  # image_folder: 2 per class


def test_the_matrix_covers_every_config_file():
    assert len(ALGOS) >= 14 and {"maml", "protonet", "mann", "siamese", "baselinepp"} <= set(ALGOS)
    assert set(TINY_COPIES) | {"omniglot", "synthetic", "sinusoid"} == set(DATA)


def regression_learners() -> set[str]:
    """The learners that declare the regression task kind (the rest must refuse sinusoid)."""
    import importlib

    out = set()
    for name in ALGOS:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            target = compose(config_name="train", overrides=[f"algo={name}"]).algo._target_
        module, cls = target.rsplit(".", 1)
        if "regression" in getattr(importlib.import_module(module), cls).task_kinds:
            out.add(name)
    return out


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("algo", ALGOS)
def test_every_learner_trains_on_every_data_set(algo, data, tmp_path, monkeypatch, request):
    overrides = ["debug=smoke", f"algo={algo}", f"data={data}", "train.steps=2", "train.val_every=2",
                 "train.val_episodes=2", "train.ckpt_every=2", "eval.n_episodes=4", "eval.chunk=4", *FAST.get(algo, [])]
    if data in TINY_COPIES:
        overrides += config_overrides(data, tmp_path) + SHAPE
    elif data == "omniglot":
        monkeypatch.setenv("FEWSHOT_DATA", str(request.getfixturevalue("omniglot_root")))
        overrides += SHAPE
    elif data == "sinusoid":
        overrides += ["backbone=mlp_sinusoid", "data.n_shot=5", "data.n_query=5"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run_dir = tmp_path / "run"
    if data == "sinusoid" and algo not in regression_learners():
        with pytest.raises(UserError, match="regression"):
            train(cfg, run_dir)
        return
    results = train(cfg, run_dir)
    metric = "test/mse" if data == "sinusoid" else "test/acc"
    assert torch.isfinite(torch.tensor(results[metric])), results
    if metric == "test/acc":
        assert 0.0 <= results[metric] <= 1.0
    assert results["test/n_episodes"] == 4
    assert (run_dir / "results.json").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
