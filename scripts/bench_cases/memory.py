"""Bench case of the memory family (see bench_cases/__init__.py for what each function returns): MANN (Santoro
et al. 2016) on its paper's Omniglot shape, against a plain reference written as the paper describes it.

``mann_5w10i_b16``: 16 sequences per step (the paper's batch) of 5 classes x 10 instances (``data.train_n_shot=1
data.train_n_query=9``, conf/paper/mann_omniglot.yaml), 20x20 images flattened (``backbone=flat``), from the
learner's batch source (``SequenceSource``: the labels shown one step late); LSTM controller of 200 units,
128 x 40 memory, 4 read heads, usage decay 0.95; Adam 1e-3 with the gradient norm clipped at 10 on both sides
(conf/algo/mann.yaml).  The images: uniform random pixels (bench_cases/metric_common.py), 4112 classes.

The package has no fast path for it: the recurrence runs its 50 time steps one after another, in both the
package and the reference, and their work per step is the same handful of small ops (docs/speed.md).
"""

from __future__ import annotations

import bench
from bench_cases import metric_common as common
from bench_cases.metric_common import Workload

N_WAY, CONTROLLER, SLOTS, WIDTH, HEADS, GAMMA = 5, 200, 128, 40, 4, 0.95  # conf/algo/mann.yaml
IMAGE = 20  # the paper's 20x20 images
COSINE_EPS = 1e-8  # under the norms' square roots (the paper's cosine has none; the package's memory.py this one)


def mann_spec(case) -> list:
    b, feat = CONTROLLER ** -0.5, IMAGE * IMAGE
    read = HEADS * WIDTH
    out_b = (CONTROLLER + read) ** -0.5
    return [("controller.weight_ih", (4 * CONTROLLER, feat + N_WAY + read), -b, b),
            ("controller.weight_hh", (4 * CONTROLLER, CONTROLLER), -b, b),
            ("controller.bias_ih", (4 * CONTROLLER,), -b, b), ("controller.bias_hh", (4 * CONTROLLER,), -b, b),
            ("key.weight", (read, CONTROLLER), -b, b), ("key.bias", (read,), -b, b),
            ("gate.weight", (HEADS, CONTROLLER), -b, b), ("gate.bias", (HEADS,), -b, b),
            ("out.weight", (N_WAY, CONTROLLER + read), -out_b, out_b), ("out.bias", (N_WAY,), -out_b, out_b)]


def mann_reference(case):
    """MANN as the paper's section 3 describes it, one time step after another over the batch of sequences:
    controller input [image, previous one-hot label, previous read vectors]; per head a key tanh(W_k h) and a
    gate sigmoid(W_a h); LRUA write weights sigmoid(a) w_r(t-1) + (1 - sigmoid(a)) w_lu(t-1), the least-used
    slot (by the previous usage) zeroed, then M += sum_heads w_w k; content read (softmax of the cosine);
    usage gamma w_u + w_r + w_w; w_lu: the H slots of smallest usage (ties: the lower slot, the rule the
    paper leaves open); output W_o [h, r]; cross-entropy over every step."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class PlainMANN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.controller = nn.LSTMCell(IMAGE * IMAGE + N_WAY + HEADS * WIDTH, CONTROLLER)
            self.key = nn.Linear(CONTROLLER, HEADS * WIDTH)
            self.gate = nn.Linear(CONTROLLER, HEADS)
            self.out = nn.Linear(CONTROLLER + HEADS * WIDTH, N_WAY)
            self.package_names = {name: name for name, _ in self.named_parameters()}

        @staticmethod
        def least_used(usage, n: int):
            idx = torch.sort(usage.detach(), dim=1, stable=True).indices[:, :n]
            return torch.zeros_like(usage).scatter_(1, idx, 1.0)

        def loss(self, batch):
            x = batch.x.flatten(2)  # (B, L, 400)
            B, L = batch.y.shape
            labels = F.one_hot(batch.y, N_WAY).to(x.dtype)
            zeros = lambda *s: torch.zeros(*s, dtype=x.dtype, device=x.device)  # noqa: E731
            h, c = zeros(B, CONTROLLER), zeros(B, CONTROLLER)
            memory, usage, w_read = zeros(B, SLOTS, WIDTH), zeros(B, SLOTS), zeros(B, HEADS, SLOTS)
            w_lu, r, prev_label = self.least_used(usage, HEADS), zeros(B, HEADS * WIDTH), zeros(B, N_WAY)
            logits = []
            for t in range(L):
                h, c = self.controller(torch.cat([x[:, t], prev_label, r], 1), (h, c))
                k = torch.tanh(self.key(h)).view(B, HEADS, WIDTH)
                a = torch.sigmoid(self.gate(h)).view(B, HEADS, 1)
                w_write = a * w_read + (1 - a) * w_lu.unsqueeze(1)
                keep = 1 - F.one_hot(usage.argmin(1), SLOTS).to(x.dtype)  # (argmin: the first of equal minima)
                memory = memory * keep.unsqueeze(2) + w_write.transpose(1, 2) @ k  # (B, N, W)
                k_norm = (k.pow(2).sum(2, keepdim=True) + COSINE_EPS).sqrt()
                m_norm = (memory.pow(2).sum(2) + COSINE_EPS).sqrt().unsqueeze(1)
                w_read = torch.softmax(k @ memory.transpose(1, 2) / (k_norm * m_norm), dim=2)  # (B, H, N)
                r = (w_read @ memory).reshape(B, -1)
                usage = GAMMA * usage + w_read.sum(1) + w_write.sum(1)
                w_lu = self.least_used(usage, HEADS)
                logits.append(self.out(torch.cat([h, r], 1)))
                prev_label = labels[:, t]
            return F.cross_entropy(torch.stack(logits, 1).flatten(0, 1), batch.y.flatten())

    return PlainMANN()


def sequence_source(case, split):
    from fewshot_runner.algorithms.mann import SequenceSource  # (the batch only: the learner's data source)

    return SequenceSource(split, case.n_way, case.n_shot, case.n_query, seed=bench.SEED_EPISODES)


WORKLOADS: dict[str, Workload] = {
    "mann": Workload("mann", "flat", mann_spec, sequence_source, mann_reference,
                     "package mann via compose_learner + SequenceSource + gradient_outer_step (a recurrence of "
                     "50 steps)", "plain MANN nn.Module as the paper's section 3 (LSTMCell, "
                     "per-step memory ops over the batch), fp32, Adam, clip 10", image_size=IMAGE, grad_clip=10.0),
}

CASES: list = [
    bench.Case("mann_5w10i_b16", "mann", N_WAY, 1, 9, 16, 2, quick=(1, 5), full=(2, 10), algo="mann"),
    # device.compile=true: one time step torch.compiled (its ~25 s compile falls in the two warm-up steps)
    bench.Case("mann_5w10i_b16_compiled", "mann", N_WAY, 1, 9, 16, 2, quick=(2, 5), full=(2, 10), algo="mann",
               overrides=("device.compile=true",)),
]


reference_step, fast_step, check, describe = common.plugin_functions(WORKLOADS)
