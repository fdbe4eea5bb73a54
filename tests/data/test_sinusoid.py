"""data=sinusoid: the MAML paper's task distribution, reproducible and disjoint task streams per split, the
sampler's checkpointed state, fixed evaluation episodes, and one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot_runner.data.sampler import EPISODE_BLOCK, fixed_episodes
from fewshot_runner.data.sinusoid import Sinusoid
from fewshot_runner.errors import DataError


def test_tasks_follow_the_papers_distribution_and_y_is_a_sin_of_x_minus_phase():
    split = Sinusoid().split("train")
    sampler = split.episode_sampler(1, 10, 7, seed=3)
    drawn = sampler.draw(4000)
    ep = sampler.gather(drawn)
    assert (ep.support_x.shape, ep.support_y.shape, ep.query_x.shape, ep.query_y.shape, ep.n_way) == (
        (4000, 10, 1), (4000, 10), (4000, 7, 1), (4000, 7), 1)
    assert ep.support_x.dtype == ep.support_y.dtype == torch.float32 and ep.batched and split.task_kind == "regression"
    amplitude, phase = drawn[:, 0], drawn[:, 1]
    x = torch.cat([ep.support_x, ep.query_x], 1).squeeze(-1)
    y = torch.cat([ep.support_y, ep.query_y], 1)
    assert torch.equal(x, drawn[:, 2:])
    # the targets, computed here: exactly A sin(x - phase)
    assert torch.equal(y, amplitude[:, None] * torch.sin(x - phase[:, None]))
    # ranges: within, and uniform over them (mean and spread of U[a, b] within 5 standard errors)
    for v, (lo, hi) in ((amplitude, (0.1, 5.0)), (phase, (0.0, math.pi)), (x.flatten(), (-5.0, 5.0))):
        assert lo <= float(v.min()) and float(v.max()) <= hi
        n, mean, sd = v.numel(), (lo + hi) / 2, (hi - lo) / math.sqrt(12)
        assert abs(float(v.double().mean()) - mean) < 5 * sd / math.sqrt(n)
        assert abs(float(v.double().std()) - sd) < 0.03 * sd
        assert float(v.min()) < lo + 0.01 * (hi - lo) and float(v.max()) > hi - 0.01 * (hi - lo)


def test_a_seed_gives_the_same_tasks_and_the_splits_draw_disjoint_streams():
    data = Sinusoid()
    first = [data.split(s).episode_sampler(1, 5, 5, seed=1).sample(50) for s in ("train", "val", "test", "trainval")]
    again = data.split("train").episode_sampler(1, 5, 5, seed=1).sample(50)
    assert torch.equal(first[0].support_x, again.support_x) and torch.equal(first[0].query_y, again.query_y)
    assert torch.equal(first[3].support_y, first[0].support_y)  # trainval: the training stream
    xs = [ep.support_x.flatten() for ep in first[:3]]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(xs[i].tolist()) & set(xs[j].tolist())  # no point in common between the splits
    other_seed = data.split("train").episode_sampler(1, 5, 5, seed=2).sample(50)
    other_data = Sinusoid(seed=1).split("train").episode_sampler(1, 5, 5, seed=1).sample(50)
    for ep in (other_seed, other_data):
        assert not set(ep.support_x.flatten().tolist()) & set(xs[0].tolist())


def test_the_sampler_state_round_trips_and_resumes_the_same_tasks():
    split = Sinusoid().split("train")
    a = split.episode_sampler(1, 10, 10, seed=0)
    a.sample(3)
    state = a.state_dict()
    expected = a.sample(25)
    b = split.episode_sampler(1, 10, 10, seed=99)
    b.load_state_dict(state)
    got = b.sample(25)
    for k in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(got, k), getattr(expected, k)), k
    assert torch.equal(b.state_dict()["generator"], a.state_dict()["generator"])


def test_fixed_evaluation_episodes_depend_on_the_seed_only_and_a_longer_run_starts_with_a_shorter_ones():
    split = Sinusoid().split("test")
    long = list(fixed_episodes(split, 1, 5, 20, EPISODE_BLOCK + 20, seed=4))
    short = list(fixed_episodes(split, 1, 5, 20, 30, seed=4))
    assert [b.n_tasks for b in long] == [EPISODE_BLOCK, 20] and [b.n_tasks for b in short] == [30]
    assert torch.equal(short[0].query_y, long[0].query_y[:30])
    assert not torch.equal(next(fixed_episodes(split, 1, 5, 20, 30, seed=5)).query_y, short[0].query_y)


@pytest.mark.parametrize("kw, fragment", [
    (dict(n_way=5), "use data.n_way=1"),
    (dict(n_shot=0), "data.n_shot and data.n_query"),
    (dict(n_query=0), "data.n_shot and data.n_query"),
])
def test_an_episode_shape_it_cannot_serve_is_one_line(kw, fragment):
    shape = {**dict(n_way=1, n_shot=5, n_query=5), **kw}
    with pytest.raises(DataError, match=fragment) as e:
        Sinusoid().split("val").check_episode_shape(shape["n_way"], shape["n_shot"], shape["n_query"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, fragment", [
    (dict(amplitude_min=5.0, amplitude_max=0.1), "data.amplitude_min=5.0 and data.amplitude_max=0.1"),
    (dict(x_max=float("inf")), "data.x_min=-5.0 and data.x_max=inf"),
    (dict(seed=True), "data.seed must be an integer"),
])
def test_bad_arguments_are_one_line(kw, fragment):
    with pytest.raises(DataError, match=fragment.replace(".", r"\.")):
        Sinusoid(**kw)


def test_the_config_composes_with_the_papers_ranges_and_smoke_keeps_it(compose_cfg):
    from fewshot_runner.engine.build import build_dataset

    for overrides in (["data=sinusoid", "debug=smoke"], ["debug=smoke", "data=sinusoid"]):
        cfg = compose_cfg(overrides)  # the command line's data= wins over the smoke preset's synthetic data
        assert cfg.data._target_ == "fewshot_runner.data.sinusoid.Sinusoid", overrides
    data = build_dataset(cfg.data)
    s = data.split("test")
    assert (s.amplitude, s.phase, s.x_range, data.x_shape) == ((0.1, 5.0), (0.0, math.pi), (-5.0, 5.0), (1,))
    assert (cfg.data.n_way, cfg.data.n_shot, cfg.data.n_query, cfg.data.train_n_query) == (1, 10, 100, 10)
