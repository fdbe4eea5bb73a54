"""PrefetchingLoader: draws in this process, gathers in DataLoader workers; the batches are bitwise
those of the plain sampler, and its state is that of the batches handed out (a resume redraws the
prefetched ones)."""

from __future__ import annotations

import io

import pytest
import torch

from fewshot_runner.data.batches import ClassBatchSampler, PairSampler
from fewshot_runner.data.loader import PrefetchingLoader
from fewshot_runner.data.sampler import EpisodeSampler
from fewshot_runner.data.store import store_split
from fewshot_runner.data.synthetic import Synthetic


@pytest.fixture(scope="module")
def split():
    return Synthetic(n_classes_train=20, per_class=8, image_size=10, seed=2).split("train")


def _tensors(batch) -> list[torch.Tensor]:
    return [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]


def _same(a, b) -> bool:
    return type(a) is type(b) and all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))


def _plain(make, sizes):
    source = make()
    return [source.sample(n) for n in sizes]


SOURCES = {
    "episodes": lambda split, seed: EpisodeSampler(split, 5, 1, 3, seed),
    "class batches": lambda split, seed: ClassBatchSampler(split, seed),
    "pairs": lambda split, seed: PairSampler(split, seed),
}


@pytest.mark.parametrize("kind", SOURCES)
def test_prefetching_loader_with_two_workers_gives_the_plain_sampler_sequence(split, kind):
    sizes = [6] * 12
    ref = _plain(lambda: SOURCES[kind](split, 3), sizes)
    with PrefetchingLoader(SOURCES[kind](split, 3), num_workers=2) as loader:
        got = [loader.sample(n) for n in sizes]
    assert all(_same(a, b) for a, b in zip(ref, got))


def test_prefetching_over_the_lazy_store_gives_the_in_memory_episodes(split, tmp_path):
    lazy = store_split(split, tmp_path / "train.store")
    ref = _plain(lambda: EpisodeSampler(split, 5, 2, 2, 9), [4] * 8)
    with PrefetchingLoader(EpisodeSampler(lazy, 5, 2, 2, 9), num_workers=2) as loader:
        got = [loader.sample(4) for _ in range(8)]
    assert all(_same(a, b) for a, b in zip(ref, got))


@pytest.mark.parametrize("kind", SOURCES)
def test_resume_from_a_state_taken_mid_stream_is_bitwise_the_uninterrupted_run(split, kind):
    """The state after 5 batches (with more drawn ahead by the workers) resumes a fresh loader, on a
    sampler of another seed, at batch 6: the batches drawn ahead and lost are drawn again."""
    ref = _plain(lambda: SOURCES[kind](split, 11), [4] * 12)
    plain = SOURCES[kind](split, 11)
    for _ in range(5):
        plain.sample(4)
    with PrefetchingLoader(SOURCES[kind](split, 11), num_workers=2, prefetch=3) as loader:
        for _ in range(5):
            loader.sample(4)
        buf = io.BytesIO()
        torch.save(loader.state_dict(), buf)  # a checkpoint, then the run is killed
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state.keys() == plain.state_dict().keys()  # the sampler's own format: either resumes the other
    with PrefetchingLoader(SOURCES[kind](split, 999), num_workers=2) as resumed:
        resumed.load_state_dict(state)
        got = [resumed.sample(4) for _ in range(7)]
    assert all(_same(a, b) for a, b in zip(ref[5:], got))
    fresh = SOURCES[kind](split, 999)
    fresh.load_state_dict(state)  # a plain sampler resumes from the loader's state too
    assert _same(fresh.sample(4), ref[5])


def test_load_state_dict_while_running_and_a_new_batch_size_redraw_from_the_consumed_state(split):
    ref_sampler = EpisodeSampler(split, 4, 1, 2, 5)
    ref = [ref_sampler.sample(n) for n in (3, 3, 5, 2)]
    with PrefetchingLoader(EpisodeSampler(split, 4, 1, 2, 5), num_workers=2) as loader:
        got = [loader.sample(3)]
        state = loader.state_dict()
        got.append(loader.sample(3))
        loader.load_state_dict(state)  # rewind one batch, workers running
        got[1] = loader.sample(3)
        got += [loader.sample(5), loader.sample(2)]
    assert all(_same(a, b) for a, b in zip(ref, got))


def test_no_workers_gives_the_same_batches(split):
    ref = _plain(lambda: PairSampler(split, 1), [5, 5, 7])
    with PrefetchingLoader(PairSampler(split, 1), num_workers=0) as loader:
        got = [loader.sample(n) for n in (5, 5, 7)]
    assert all(_same(a, b) for a, b in zip(ref, got))


def test_loader_never_draws_from_the_global_generator(split):
    """Augmentations draw from the global generator and a resume restores it: the loader (its worker
    seeds included) must leave it alone."""
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    with PrefetchingLoader(EpisodeSampler(split, 5, 1, 1, 0), num_workers=2) as loader:
        for _ in range(4):
            loader.sample(2)
        loader.load_state_dict(loader.state_dict())
        loader.sample(2)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_closed_loader_leaves_its_source_at_the_consumed_state(split):
    source = EpisodeSampler(split, 5, 1, 1, 8)
    ref = _plain(lambda: EpisodeSampler(split, 5, 1, 1, 8), [2, 2, 2])
    loader = PrefetchingLoader(source, num_workers=2)
    first = [loader.sample(2), loader.sample(2)]
    loader.close()
    assert all(_same(a, b) for a, b in zip(ref, first + [source.sample(2)]))


@pytest.mark.parametrize("bad", [{"num_workers": -1}, {"num_workers": 1.5}, {"prefetch": 0}])
def test_bad_loader_arguments(split, bad):
    with pytest.raises(ValueError):
        PrefetchingLoader(EpisodeSampler(split, 5, 1, 1, 0), **bad)
