"""Sinusoid regression (Finn, Abbeel & Levine 2017, §5.1): each task is y = A sin(x - phase) with the
amplitude A ~ U[0.1, 5] and the phase ~ U[0, pi]; its points x ~ U[-5, 5]; the loss is the mean squared
error.  K support points (``data.n_shot``) to adapt on, ``data.n_query`` points to score.

Not a :class:`~fewshot_runner.data.base.ClassSplit`: a :class:`SinusoidSplit` has no stored items, it
generates tasks.  It offers the split-level methods the engine calls on any split
(``check_episode_shape``, ``episode_sampler``; ``data.sampler.fixed_episodes`` draws evaluation episodes
through the latter), and says ``task_kind = "regression"``, so the engine measures the MSE instead of
the accuracy.

Episodes have one output (``n_way = 1``): support_x (T, K, 1), support_y (T, K), query_x (T, Q, 1),
query_y (T, Q), float32.  (The targets have no trailing output dimension, so that ``Episode.batched``
and ``Episode.task`` read them as they read class labels; learners score outputs (..., 1) against them.)

Splits: every split draws from a generator of its own, seeded from (``data.seed``, the split's stream,
the sampler's seed) through SHA-256, so train, validation and test tasks come from disjoint random
streams even when the run's seeds coincide (train: ``seed + 1``, test: ``eval.seed + 1``).  ``trainval``
is the training stream (there are no classes to hold out; ``train.split=trainval`` just skips validation).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fewshot_runner.data.base import EpisodicDataset
from fewshot_runner.episode import Episode
from fewshot_runner.errors import DataError

# The paper's task distribution
AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)

# which random stream each split draws from (trainval: the training stream)
STREAMS = {"train": "train", "val": "val", "test": "test", "trainval": "train"}


def stream_seed(data_seed: int, stream: str, seed: int) -> int:
    """A 63-bit generator seed from (data set seed, stream name, sampler seed): distinct inputs give
    unrelated streams (SHA-256), the same inputs the same stream on every machine."""
    digest = hashlib.sha256(f"fewshot_runner.sinusoid/{data_seed}/{stream}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sinusoid(amplitude: torch.Tensor, phase: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = amplitude * sin(x - phase); amplitude and phase (T,) broadcast over x (T, N) -> (T, N)."""
    return amplitude.unsqueeze(-1) * torch.sin(x - phase.unsqueeze(-1))


@dataclass
class SinusoidSplit:
    """One split of the sinusoid task distribution (see the module docstring): ranges and a seed, no data.

    The ranges are (low, high) of the uniform draws of the amplitude, the phase and the points x.
    """

    name: str
    amplitude: tuple[float, float] = AMPLITUDE
    phase: tuple[float, float] = PHASE
    x_range: tuple[float, float] = X_RANGE
    data_seed: int = 0

    #: what its episodes ask of a learner (data/base.py: ClassSplit says "classification")
    task_kind: ClassVar[str] = "regression"

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (1,)

    @property
    def n_classes(self) -> int:
        """The outputs a learner needs: one (the value of the function); there are no classes."""
        return 1

    @property
    def stream(self) -> str:
        return STREAMS.get(self.name, self.name)

    def check_episode_shape(self, n_way: int, n_shot: int, n_query: int) -> None:
        """A one-line DataError unless ``n_way`` is 1 and there are support and query points."""
        if n_way != 1:
            raise DataError(f"data.n_way={n_way}: sinusoid tasks are regression with one output; use data.n_way=1 "
                            f"(and data.train_n_way=null or 1)")
        if n_shot < 1 or n_query < 1:
            raise DataError(f"data.n_shot and data.n_query (support and query points per task) must be >= 1 "
                            f"(got {n_shot}, {n_query})")

    def episode_sampler(self, n_way: int, n_shot: int, n_query: int, seed: int) -> "SinusoidSampler":
        """The batch source of this split's tasks with ``n_shot`` support and ``n_query`` query points."""
        self.check_episode_shape(n_way, n_shot, n_query)
        return SinusoidSampler(self, n_shot, n_query, seed)


class SinusoidSampler:
    """Batches of sinusoid tasks from the split's own ``torch.Generator`` (checkpointed: bitwise resume).

    ``sample(n) == gather(draw(n))`` as for ``EpisodeSampler`` (so ``data.loader.PrefetchingLoader`` works):
    ``draw`` makes every random number, ``gather`` computes the targets.
    """

    def __init__(self, split: SinusoidSplit, n_shot: int, n_query: int, seed: int) -> None:
        self.split = split
        self.n_way, self.n_shot, self.n_query = 1, n_shot, n_query
        self.generator = torch.Generator().manual_seed(stream_seed(split.data_seed, split.stream, seed))

    def sample(self, n_tasks: int) -> Episode:
        return self.gather(self.draw(n_tasks))

    def draw(self, n_tasks: int) -> torch.Tensor:
        """float32 (n_tasks, 2 + n_shot + n_query): per task its amplitude, its phase, then its points x
        (support first).  Only this advances the generator."""
        s = self.split
        u = torch.rand(n_tasks, 2 + self.n_shot + self.n_query, generator=self.generator)
        lows = torch.tensor([s.amplitude[0], s.phase[0]] + [s.x_range[0]] * (u.shape[1] - 2))
        highs = torch.tensor([s.amplitude[1], s.phase[1]] + [s.x_range[1]] * (u.shape[1] - 2))
        return lows + (highs - lows) * u

    def gather(self, drawn: torch.Tensor) -> Episode:
        """The Episode of drawn tasks: x (T, N, 1), y = A sin(x - phase) (T, N), support then query."""
        amplitude, phase, x = drawn[:, 0], drawn[:, 1], drawn[:, 2:]
        y = sinusoid(amplitude, phase, x)
        k = self.n_shot
        return Episode(x[:, :k].unsqueeze(-1).clone(), y[:, :k].clone(), x[:, k:].unsqueeze(-1).clone(),
                       y[:, k:].clone(), 1)

    def function(self, drawn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The drawn tasks' functions at other points (pictures): x (T, N) -> y (T, N)."""
        return sinusoid(drawn[:, 0], drawn[:, 1], x)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _check_range(key: str, low: float, high: float) -> tuple[float, float]:
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise DataError(f"data.{key}_min={low} and data.{key}_max={high} must be finite numbers with min <= max")
    return float(low), float(high)


def Sinusoid(amplitude_min: float = AMPLITUDE[0], amplitude_max: float = AMPLITUDE[1], phase_min: float = PHASE[0],
             phase_max: float = PHASE[1], x_min: float = X_RANGE[0], x_max: float = X_RANGE[1],
             seed: int = 0) -> EpisodicDataset:
    """An EpisodicDataset named "sinusoid" with splits train, val, test and trainval (module docstring)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"data.seed must be an integer (got {seed!r})")
    ranges = {"amplitude": _check_range("amplitude", amplitude_min, amplitude_max),
              "phase": _check_range("phase", phase_min, phase_max), "x_range": _check_range("x", x_min, x_max)}
    splits = {name: SinusoidSplit(name, data_seed=seed, **ranges) for name in ("train", "val", "test", "trainval")}
    return EpisodicDataset("sinusoid", splits)
