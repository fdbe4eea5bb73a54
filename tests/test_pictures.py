"""The episode and embedding pictures (plots_episodes.py): what they draw, PCA against an SVD written here, and
the files after `fewshot train debug=smoke` and `fewshot eval`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from fewshot_runner import plots_episodes as pe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_marked_wrong_queries_are_the_wrong_predictions(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_way, n_query = 4, 3
    support_x = torch.randint(0, 256, (n_way * 2, 3, 10, 10), generator=g, dtype=torch.uint8)  # 2-shot, RGB
    support_y = torch.arange(n_way).repeat_interleave(2)
    query_x = torch.rand(n_way * n_query, 1, 10, 10, generator=g)
    query_y = torch.arange(n_way).repeat_interleave(n_query)
    predicted = query_y.clone()
    predicted[[1, 5, 6, 11]] = torch.tensor([2, 0, 3, 1])  # four wrong
    drawn = pe.draw_episode(tmp_path / "e.png", support_x, support_y, query_x, predicted, torch.full((12,), 0.5),
                            ["a", "b", "c", "d"], query_y=query_y)
    assert drawn["marked_wrong"] == int((predicted != query_y).sum()) == 4
    assert drawn["marked_right"] == 8 and drawn["queries"] == list(range(12)) and drawn["support"] == 8
    assert (tmp_path / "e.png").stat().st_size > 1000
    unlabelled = pe.draw_episode(tmp_path / "p.png", support_x, support_y, query_x, predicted, torch.full((12,), 0.5),
                                 ["a", "b", "c", "d"], query_names=[f"q{i}.png" for i in range(12)])
    assert unlabelled["marked_wrong"] == unlabelled["marked_right"] == 0  # no truth, no frames


def test_a_large_episode_shows_the_first_queries_of_each_class_in_turn():
    y = torch.arange(5).repeat_interleave(30)  # 150 queries
    shown = pe.shown_queries(y, 5, limit=100)
    assert len(shown) == 100 and torch.bincount(y[shown]).tolist() == [20] * 5
    assert shown[:20] == list(range(20))


def test_display_image_takes_uint8_float_one_and_three_channels():
    gray = pe.display_image(torch.full((1, 4, 4), 255, dtype=torch.uint8))
    assert gray.shape == (4, 4) and float(gray.max()) == 1.0
    rgb = pe.display_image(torch.tensor([-1.0, 0.0, 3.0]).view(3, 1, 1).expand(3, 2, 2))  # normalised: stretched
    assert rgb.shape == (2, 2, 3) and np.allclose(rgb[0, 0], [0.0, 0.25, 1.0])


def test_pca_equals_an_svd_of_the_centred_points():
    z = torch.randn(40, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 8)
    xy = pe.pca_2d(z).numpy()
    centred = z.numpy() - z.numpy().mean(0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    expected = u[:, :2] * s[:2]  # the scores on the top two components, up to each component's sign
    for j in range(2):
        sign = np.sign(expected[np.abs(expected[:, j]).argmax(), j])
        np.testing.assert_allclose(xy[:, j], sign * expected[:, j], rtol=1e-10, atol=1e-12)
    assert np.abs(xy[:, 0]).max() == xy[np.abs(xy[:, 0]).argmax(), 0]  # sign fixed: largest coordinate positive
    flat = pe.pca_2d(torch.randn(5, 1, dtype=torch.float64))
    assert torch.all(flat[:, 1] == 0)  # one dimension: no second component


def tiny_setup():
    """A synthetic test split (6 classes of 8 16x16 images), an untrained tiny ProtoNet and a CPU runtime."""
    from omegaconf import OmegaConf

    from fewshot_runner.algorithms.protonet import PrototypicalNetworks
    from fewshot_runner.backbones.conv import Conv4
    from fewshot_runner.config import DeviceConfig
    from fewshot_runner.data.synthetic import Synthetic
    from fewshot_runner.engine.device import resolve_runtime

    split = Synthetic(n_classes_train=2, n_classes_val=2, n_classes_test=6, per_class=8, image_size=16).split("test")
    torch.manual_seed(0)
    algo = PrototypicalNetworks(Conv4((1, 16, 16), hidden=4, pool=True, fused_ops="off"), n_way=5, feature_dim=4)
    runtime = resolve_runtime(OmegaConf.structured(DeviceConfig(type="cpu", threads=1, channels_last="off")))
    return split, algo, runtime


def test_episode_maker_draws_the_first_test_episode_with_the_learners_predictions(tmp_path, monkeypatch):
    """The maker's picture: the first episode `evaluate` scores for that seed, its wrong ones marked."""
    from fewshot_runner.data.sampler import fixed_episodes
    from fewshot_runner.engine.build import Shape

    split, algo, runtime = tiny_setup()
    algo.eval()  # as save_pictures sets it
    seen = {}
    draw = pe.draw_episode
    monkeypatch.setattr(pe, "draw_episode", lambda *a, **k: seen.setdefault("drawn", draw(*a, **k)))
    shape = Shape(5, 1, 3)
    out = pe.episode_picture(algo, split, shape, runtime, None, tmp_path, seed=11)
    assert out == [(tmp_path / "episode.png", "episode")] and out[0][0].is_file()
    first = next(iter(fixed_episodes(split, 5, 1, 3, 1, seed=11)))
    with torch.no_grad():
        wrong = int((algo.predict(first.to("cpu")).argmax(-1) != first.query_y).sum())
    assert seen["drawn"]["marked_wrong"] == wrong and seen["drawn"]["marked_right"] == 15 - wrong
    emb = pe.embedding_picture(algo, split, shape, runtime, None, tmp_path, seed=11)
    assert emb == [(tmp_path / "embedding.png", "embedding")] and emb[0][0].is_file()


def test_learners_without_embeddings_get_no_embedding_picture(tmp_path, recwarn):
    from fewshot_runner.algorithms.base import MetaLearner
    from fewshot_runner.engine.build import Shape

    class NoEmbed(MetaLearner):
        pass

    split, _, runtime = tiny_setup()
    assert pe.embedding_picture(NoEmbed(), split, Shape(5, 1, 3), runtime, None, tmp_path, 0) == []
    assert not (tmp_path / "embedding.png").exists() and not recwarn.list  # no picture, and no warning either


def test_protonet_embed_episode_gives_the_prototypes_of_its_embeddings():
    from conftest import toy_episodes
    from fewshot_runner.algorithms.protonet import PrototypicalNetworks

    eps = toy_episodes(n_tasks=2, n_way=3, n_query=2)
    algo = PrototypicalNetworks(torch.nn.Flatten(), n_way=3, feature_dim=256).double()
    emb = algo.embed_episode(eps)
    assert emb["support"].shape == (2, 3, 256) and emb["query"].shape == (2, 6, 256)
    torch.testing.assert_close(emb["prototypes"], eps.support_x.flatten(2))  # 1-shot: the support images themselves


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    p = run_cli(["train", "algo=protonet", "debug=smoke", "eval.pictures=true", "device.threads=1", "backbone.hidden=8",
                 "eval.n_episodes=6", "train.val_episodes=4", f"hydra.run.dir={root / 'run'}"], root)
    assert p.returncode == 0, p.stderr[-2000:]
    return root / "run"


def test_pictures_after_smoke_training_and_after_eval(smoke_run, tmp_path, compose_cfg):
    """`fewshot train debug=smoke` (the command) and `fewshot eval` (its function, in this process: the same
    code after Hydra) each leave both pictures in their run dir."""
    from fewshot_runner.engine.eval_checkpoint import evaluate_checkpoint

    for name in ("episode.png", "embedding.png"):
        assert (smoke_run / name).stat().st_size > 1000, name
    ev = tmp_path / "ev"
    evaluate_checkpoint(compose_cfg([f"checkpoint={smoke_run / 'checkpoints' / 'best.pt'}", "eval.n_episodes=6",
                                     "device=cpu", "device.threads=1"], name="eval"), run_dir=ev)
    for name in ("episode.png", "embedding.png"):
        assert (ev / name).stat().st_size > 1000, name
