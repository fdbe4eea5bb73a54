"""Memory-augmented neural networks, MANN (Santoro et al. 2016): an LSTM controller with an external memory
read by content and written with least-recently-used access (LRUA); the memory equations are the pure
functions of :mod:`fewshot_runner.algorithms.memory`, this module is the shell around them.

Training: sequences, not support/query episodes.  :class:`SequenceSource` takes the episodes of
:class:`~fewshot_runner.data.sampler.EpisodeSampler` (``n_shot + n_query`` instances of each of ``n_way``
classes: the paper's 10 per class, 50-step episodes with 5 classes; labels a fresh permutation per task) and
shuffles each task's items into one sequence with a generator of its own.  At step t the controller gets the
encoded image of item t, the one-hot label of item t - 1 (zeros at t = 0) and the memory's read vectors of
step t - 1, and predicts the class of item t; the loss is the cross-entropy over every step.  The metrics add
the accuracy per presentation of a class (``acc_inst1``, ``acc_inst2``, ... ``acc_inst10``), the paper's
measure.

The image encoder is the run's backbone: ``backbone=flat`` (the default of ``algo=mann``: the flattened
image, as the paper) or a convolutional one (``backbone=conv4``).

Validation and test (``predict``, on ordinary episodes): the support items, in an order fixed by the episode
shape, are one sequence with their labels shown one step late; then each query is one more step from the
state after the last support item (its label input: the last support label), so the queries are scored
before any query label is shown, and no query sees another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.algorithms.base import MetaLearner, accuracy, cross_entropy
from fewshot_runner.algorithms.memory import (PAPER_INSTANCES, instance_accuracy, least_used, read, read_weights,
                                              sequence_inputs, usage_update, write, write_weights)
from fewshot_runner.episode import Episode, _move_x, _move_y
from fewshot_runner.errors import UserError

#: The sequence order's generator is seeded with the run's sampler seed plus this (a stream of its own).
ORDER_SEED_OFFSET = 0x4D414E4E  # "MANN"

#: The support order at test time: a permutation drawn from a generator seeded with this (and nothing else),
#: the same for every episode of a shape, so a result depends on neither eval.chunk nor any global generator.
SUPPORT_ORDER_SEED = 20160519
TEST_BLOCK = 50  # test sequences per forward (test_measures)


@dataclass
class SequenceBatch:
    """Episodes as sequences (:class:`SequenceSource`).

    x: images (n_tasks, length, *x_shape); y: class ids (n_tasks, length) long in 0..n_way-1, the label of
    item t (input to the controller at step t + 1); n_way: classes per sequence.
    """

    x: torch.Tensor
    y: torch.Tensor
    n_way: int

    @property
    def n_tasks(self) -> int:
        return self.y.shape[0]

    def map_inputs(self, fn) -> "SequenceBatch":
        """``fn`` applied to the images (as (n_tasks * length, *x_shape)), labels untouched."""
        t, n = self.y.shape
        return SequenceBatch(fn(self.x.flatten(0, 1)).unflatten(0, (t, n)), self.y, self.n_way)

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "SequenceBatch":
        """As ``Episode.to``: uint8 images become float in [0, 1] on ``device``, labels keep their dtype."""
        return SequenceBatch(_move_x(self.x, device, dtype, non_blocking), _move_y(self.y, device, dtype, non_blocking),
                             self.n_way)

    def pin_memory(self) -> "SequenceBatch":
        return SequenceBatch(self.x.pin_memory(), self.y.pin_memory(), self.n_way)


class SequenceSource:
    """MANN's batch source: each task of an :class:`EpisodeSampler` episode (its support and query items
    together, ``n_shot + n_query`` per class) in a random order, from this source's own generator.

    ``sample(n) == gather(draw(n))`` (``data.workers`` gathers in workers); ``state_dict`` holds both
    generators, so a resumed run draws the same sequences.
    """

    def __init__(self, split, n_way: int, n_shot: int, n_query: int, seed: int) -> None:
        from fewshot_runner.data.sampler import EpisodeSampler

        self.episodes = EpisodeSampler(split, n_way, n_shot, n_query, seed=seed)
        self.n_way, self.length = n_way, n_way * (n_shot + n_query)
        self.generator = torch.Generator().manual_seed(seed + ORDER_SEED_OFFSET)

    def draw(self, n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sampler's items (n_tasks, n_way, n_shot + n_query), each task's order (n_tasks, length))."""
        items = self.episodes.draw(n_tasks)
        order = torch.rand(n_tasks, self.length, generator=self.generator).argsort(1)
        return items, order

    def gather(self, drawn: tuple[torch.Tensor, torch.Tensor]) -> SequenceBatch:
        items, order = drawn
        ep = self.episodes.gather(items)
        x = torch.cat([ep.support_x, ep.query_x], 1)
        y = torch.cat([ep.support_y, ep.query_y], 1)
        rows = torch.arange(order.shape[0]).unsqueeze(1)
        return SequenceBatch(x[rows, order], y[rows, order], ep.n_way)

    def sample(self, n_tasks: int) -> SequenceBatch:
        """``n_tasks`` sequences: x (n_tasks, length, *x_shape) uint8, y (n_tasks, length) long."""
        return self.gather(self.draw(n_tasks))

    def state_dict(self) -> dict:
        return {"episodes": self.episodes.state_dict(), "order": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.episodes.load_state_dict(state["episodes"])
        self.generator.set_state(state["order"])


class MemoryState(NamedTuple):
    """What the recurrence carries from step to step (B sequences, H heads, N slots of width W, C units)."""

    h: torch.Tensor  # controller output (B, C)
    c: torch.Tensor  # controller cell (B, C)
    memory: torch.Tensor  # (B, N, W)
    usage: torch.Tensor  # w_u (B, N)
    w_read: torch.Tensor  # read weights of the last step (B, H, N)
    w_lu: torch.Tensor  # least-used weights of the last step's usage (B, N)
    r: torch.Tensor  # read vectors of the last step, concatenated (B, H * W)

    def repeat(self, k: int) -> "MemoryState":
        """Each sequence's state ``k`` times, consecutively ((B * k, ...))."""
        return MemoryState(*(t.repeat_interleave(k, 0) for t in self))


class MANN(MetaLearner):
    """LSTM controller (``controller_size`` units) + a ``memory_slots`` x ``memory_width`` memory with
    ``read_heads`` heads; usage decay ``gamma``.  The label input and the output are ``n_way`` wide (the
    training shape's), so other n_way are refused.

    Per step (module docstring): (h, c) = LSTM([image features, previous one-hot label, r_prev]); per head a
    key k = tanh(W_k h) and a gate alpha = W_a h; write (LRUA), read by content, update usage; logits =
    W_o [h, r]."""

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, controller_size: int = 200,
                 memory_slots: int = 128, memory_width: int = 40, read_heads: int = 4, gamma: float = 0.95) -> None:
        super().__init__()
        for key, v in (("controller_size", controller_size), ("memory_slots", memory_slots),
                       ("memory_width", memory_width), ("read_heads", read_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"algo.{key}={v} must be a positive integer")
        if read_heads > memory_slots:
            raise UserError(f"algo.read_heads={read_heads} is more than algo.memory_slots={memory_slots}; "
                            f"lower algo.read_heads")
        if not 0.0 <= gamma <= 1.0:
            raise UserError(f"algo.gamma={gamma} (the usage decay) must be in [0, 1]; the default is 0.95")
        self.backbone = backbone
        self.n_way, self.heads, self.slots, self.width = n_way, read_heads, memory_slots, memory_width
        self.gamma = float(gamma)
        read_dim = read_heads * memory_width
        self.controller = nn.LSTMCell(feature_dim + n_way + read_dim, controller_size)
        self.key = nn.Linear(controller_size, read_dim)
        self.gate = nn.Linear(controller_size, read_heads)
        self.out = nn.Linear(controller_size + read_dim, n_way)

    supports_compile = True

    def compile_for_speed(self) -> None:
        """``device.compile=true``: ``torch.compile`` one time step (``step``; the state-dict keys are
        unchanged). The recurrence is 50 steps of small ops, bound by per-op overhead; the compiled step
        fuses them (docs/speed.md). About 25 s of compiling at the first step (and per new batch shape)."""
        self.step = torch.compile(self.step)

    # ------------------------------------------------------------------ the recurrence
    def initial_state(self, batch: int, like: torch.Tensor) -> MemoryState:
        """Zeros everywhere (memory, usage, read weights and vectors, controller); the least-used weights of
        zero usage: slots 0..H-1."""
        z = lambda *shape: torch.zeros(*shape, dtype=like.dtype, device=like.device)  # noqa: E731
        usage = z(batch, self.slots)
        c = self.controller.hidden_size
        return MemoryState(z(batch, c), z(batch, c), z(batch, self.slots, self.width), usage,
                           z(batch, self.heads, self.slots), least_used(usage, self.heads),
                           z(batch, self.heads * self.width))

    def step(self, state: MemoryState, inp: torch.Tensor) -> tuple[MemoryState, torch.Tensor]:
        """One time step: inp (B, feature_dim + n_way) -> (the next state, logits (B, n_way))."""
        b = inp.shape[0]
        h, c = self.controller(torch.cat([inp, state.r], -1), (state.h, state.c))
        keys = torch.tanh(self.key(h)).view(b, self.heads, self.width)
        alpha = self.gate(h).unsqueeze(-1)  # (B, H, 1)
        w_write = write_weights(alpha, state.w_read, state.w_lu)
        memory = write(state.memory, w_write, keys, state.usage)
        w_read = read_weights(keys, memory)
        r = read(w_read, memory).flatten(1)
        usage = usage_update(state.usage, w_read, w_write, self.gamma)
        logits = self.out(torch.cat([h, r], -1))
        return MemoryState(h, c, memory, usage, w_read, least_used(usage, self.heads), r), logits

    def run(self, inputs: torch.Tensor) -> tuple[torch.Tensor, MemoryState]:
        """The whole sequence, step after step: inputs (B, L, feature_dim + n_way) -> (logits (B, L, n_way),
        the state after the last step)."""
        state = self.initial_state(inputs.shape[0], inputs)
        out = []
        for t in range(inputs.shape[1]):
            state, logits = self.step(state, inputs[:, t])
            out.append(logits)
        return torch.stack(out, 1), state

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, L, *x_shape) -> features (B, L, feature_dim), one backbone pass."""
        return self.backbone(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def sequence_logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, n_way) of sequences x (B, L, *x_shape), y (B, L): step t sees label y[t - 1]."""
        return self.run(sequence_inputs(self.encode(x), y, self.n_way))[0]

    # ------------------------------------------------------------------ training
    def batch_source(self, split, n_way: int, n_shot: int, n_query: int, seed: int) -> SequenceSource:
        return SequenceSource(split, n_way, n_shot, n_query, seed)

    def meta_loss(self, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(batch, SequenceBatch):
            raise UserError("MANN trains on sequences from its own batch source (SequenceSource), not on "
                            f"{type(batch).__name__}")
        self.check_n_way(batch.n_way)
        logits = self.sequence_logits(batch.x, batch.y)
        loss = cross_entropy(logits, batch.y)
        metrics = {"loss": loss.detach(), "acc": accuracy(logits.detach(), batch.y)}
        for k, acc in instance_accuracy(logits.detach(), batch.y, self.n_way).items():
            metrics[f"acc_inst{k}"] = acc.mean()
        return loss, metrics

    def execution_notes(self, task_threads: int) -> dict[str, str]:
        return {"task execution": "all sequences of the batch at once, one time step after another (a recurrence: "
                                  "no task threads, chunks or convolution fast paths)"}

    def check_n_way(self, n_way: int) -> None:
        if n_way != self.n_way:
            raise UserError(f"MANN's label input and output are {self.n_way} classes wide (its training n_way); "
                            f"it cannot serve {n_way}-way episodes: use data.n_way={self.n_way}")

    # ------------------------------------------------------------------ evaluation
    def predict(self, episodes: Episode) -> torch.Tensor:
        """Logits (n_tasks, n_query_total, n_way): the support set as a sequence (an order fixed by its size,
        :data:`SUPPORT_ORDER_SEED`), then each query one step from the state after it (module docstring)."""
        self.check_n_way(episodes.n_way)
        if not episodes.batched:
            return self.predict(episodes.map_tensors(lambda t: t.unsqueeze(0)))[0]
        n_tasks, n_support = episodes.support_y.shape
        n_query = episodes.query_y.shape[1]
        order = support_order(n_support).to(episodes.support_y.device)
        ys = episodes.support_y[:, order]
        feats = self.encode(torch.cat([episodes.support_x[:, order], episodes.query_x], 1))
        _, state = self.run(sequence_inputs(feats[:, :n_support], ys, self.n_way))
        last = F.one_hot(ys[:, -1], self.n_way).to(feats.dtype).unsqueeze(1).expand(n_tasks, n_query, self.n_way)
        inp = torch.cat([feats[:, n_support:], last], -1).flatten(0, 1)
        _, logits = self.step(state.repeat(n_query), inp)
        return logits.view(n_tasks, n_query, self.n_way)

    def test_measures(self, split, n_way: int, per_class: int, n_tasks: int, seed: int, runtime,
                      transform=None, instances: tuple[int, ...] = PAPER_INSTANCES) -> dict[str, torch.Tensor]:
        """The paper's measure on ``n_tasks`` test sequences of MANN's own batch source (``n_way`` classes x
        ``per_class`` instances, shuffled, labels permuted per sequence; seeded by ``seed``):
        ``{"acc_inst<k>": (n_tasks,) accuracy at the k-th presentation of a class}`` for each k of
        ``instances`` within ``per_class`` (results.json, ``scripts/mann_instances.py``)."""
        source = SequenceSource(split, n_way, 1, per_class - 1, seed)
        per_k: dict[int, list[torch.Tensor]] = {}
        for start in range(0, n_tasks, TEST_BLOCK):
            batch = source.sample(min(TEST_BLOCK, n_tasks - start)).to(runtime.device)
            if transform is not None:
                batch = batch.map_inputs(transform)
            with runtime.autocast():
                for k, acc in self.instance_accuracy(batch, instances).items():
                    per_k.setdefault(k, []).append(acc.cpu())
        return {f"acc_inst{k}": torch.cat(v) for k, v in per_k.items()}

    def instance_accuracy(self, batch: SequenceBatch, instances: tuple[int, ...] = PAPER_INSTANCES):
        """The paper's measure on sequences: {k: (n_tasks,) accuracy at the k-th presentation of a class}
        (``scripts/mann_instances.py``: the test table).  Call under ``torch.no_grad()`` in eval mode."""
        return instance_accuracy(self.sequence_logits(batch.x, batch.y), batch.y, self.n_way, instances)


def support_order(n_support: int) -> torch.Tensor:
    """The test-time order of a support set of ``n_support`` items: a fixed permutation (n_support,) long."""
    return torch.randperm(n_support, generator=torch.Generator().manual_seed(SUPPORT_ORDER_SEED + n_support))
