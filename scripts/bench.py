"""Speed benchmark: the package's fast path against a plain reference, in one run.

    python scripts/bench.py                       # full set (``make bench``), under 10 minutes on 2 cores
    python scripts/bench.py --quick --json b.json # about 3 minutes on 2 quiet cores
    python scripts/bench.py --cases sampler,maml_5w1s_mb32_1step --iters 2 --warmup 1 --tiny
    python scripts/bench.py --quick --precision bf16 --cases maml_5w1s_mb32_1step,maml_5w1s_mb32_5step

Every (case, implementation) runs in its own process (this script, ``--impl fast|ref``):

* ``fast``: what users run. The model is built from the project's own configs
  (``compose("train", algo=..., backbone=conv4, device.fused_ops=on|off)`` -> ``build_learner``),
  stepped by ``gradient_outer_step`` with Adam, as ``fewshot train`` does. ``fused_ops`` is
  ``on`` when ``fewshot_runner.ops.bn_relu_pool`` imports, else ``off``. The sampler case times
  ``EpisodeSampler.sample``. On CUDA, MAML runs with ``device.batch_tasks=auto``: all tasks of
  the batch at once under ``torch.func.vmap`` (batch norm from primitives); the fused op is CPU-only.
* ``ref``: a plain reference written here, independent of the package's algorithms: Conv4
  (conv -> F.batch_norm(training=True) -> relu -> max_pool2d, 64 channels, unfused), a
  per-task ``torch.func.functional_call`` loop with ``torch.autograd.grad(create_graph=True)``,
  fp32, Adam; same weights (generated here) and same tasks (the package's seeded sampler on
  its synthetic data). The sampler reference is a per-task Python sampler.

The reference is timed twice: under the same allocator setting as the fast path
(``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, what ``fewshot`` sets for itself) and
under glibc's defaults.

Cases: MAML / FOMAML 5-way 1-shot 15 queries, 32 tasks per outer step, inner lr 0.4, Adam 1e-3;
ANIL and Meta-SGD on the same shape (``algo=anil``: the head alone adapts; ``algo=metasgd``: a learned
rate per weight, all at 0.4, their gradients in the check too);
``maml_stridednet_5w1s_mb32_1q``: the MAML Omniglot preset's shape (the paper's net: stride-2
convolutions, no max-pool, on both sides; 1 query per class; on CPU the fast path runs the 32
tasks as the groups of grouped convolutions, ``device.batch_tasks=auto``);
ProtoNet 5-way 5-shot 15 queries and 20-way 1-shot 5 queries, 4 episodes per outer step (one
forward over the batch, batch norm over the batch, as the package); the sampler: 32 tasks
5w1s15q from a 4112-class x 20-image split, CPU only. ``--tiny`` shrinks the batches (MAML 2
tasks, ProtoNet 1 episode) for tests.

``grad_rel_err``: max over parameter tensors of ||g_fast - g_ref|| / ||g_ref||, g_fast the fast
path's fp32 meta-gradient, g_ref the plain reference's float64 one, same initial weights and
tasks (the first ``grad_check_tasks`` tasks of the batch: 4, 1 with --tiny). It is taken on the
SMOOTH twin of the net (softplus, avg-pool) when the fast path can run it (unfused ops), else
(the fused op is ReLU/max-pool only) on the real ReLU/max-pool net, where it also measures
fp32 rounding flipping ReLU / max-pool decisions (1e-6 to 1e-2 here, depending on the tasks,
for any fp32 implementation): read it against ``ref_grad_rel_err``, the same error of the
plain reference run in fp32 (the fp32 floor of that net), and against ``grad_rel_err_fp64``,
the fast path run in float64 against the float64 reference (exactness of the implementation,
about 1e-14 when exact; None when the fast path cannot run in float64).
``grad_rel_err_vs_ref_fp32`` compares the two fp32 meta-gradients. ``grad_check`` says
which net was used. Tensors whose gradient is zero in exact arithmetic (conv biases before a
training-mode batch norm: ||g_ref|| < 1e-6 of the total) are left out of the max and reported
as ``zero_grad_err`` = ||g_fast - g_ref|| / ||g_ref total||.

Timings are wall-clock per outer step (``torch.cuda.synchronize`` on CUDA); ``peak_mem_mb`` is
the child's peak RSS on CPU (the whole process: torch and the data included) or
``torch.cuda.max_memory_allocated`` on CUDA, taken before the gradient check.
``load_avg_1m`` records the machine's load before each case: compare only quiet runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fewshot_runner.cli import ALLOCATOR_ENV  # the launcher's setting (imports no torch)

# The plugins of scripts/bench_cases/ import this module as ``bench``: run as a script, it is ``__main__``,
# so give them this very module instead of a second copy.
sys.modules.setdefault("bench", sys.modules[__name__])

RESULT_PREFIX = "BENCH_RESULT "
SEED_WEIGHTS, SEED_DATA, SEED_EPISODES = 0, 0, 1
INNER_LR, OUTER_LR = 0.4, 1e-3
HIDDEN, X_SHAPE = 64, (1, 28, 28)


# ============================================================================= cases
@dataclass(frozen=True)
class Case:
    """One benchmark: an episode shape, a workload (``maml`` / ``protonet`` / ``sampler``) and
    its iteration counts (warm-up, timed) for ``--quick`` and the full run."""

    name: str
    workload: str
    n_way: int
    n_shot: int
    n_query: int
    meta_batch: int
    tiny_meta_batch: int
    quick: tuple[int, int]
    full: tuple[int, int]
    inner_steps: int = 1
    first_order: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    strided: bool = False  # the MAML paper's Omniglot net (stride-2 convolutions, no max-pool)
    # the gradient-based learner (workload maml): maml, fomaml, anil (the head alone adapts), metasgd (a
    # learned rate per weight, all starting at INNER_LR)
    algo: str = "maml"
    # extra `fewshot train` overrides of a plugin case (scripts/bench_cases/), e.g. ("algo.fce=true",)
    overrides: tuple[str, ...] = ()

    def batch(self, tiny: bool) -> int:
        return self.tiny_meta_batch if tiny else self.meta_batch

    @property
    def feature_dim(self) -> int:
        return HIDDEN * (4 if self.strided else 1)  # 28 -> 14 -> 7 -> 4 -> 2 (strided) or -> 3 -> 1 (pooled)


CASES = [
    Case("maml_5w1s_mb32_1step", "maml", 5, 1, 15, 32, 2, quick=(1, 3), full=(2, 10)),
    Case("maml_5w1s_mb32_5step", "maml", 5, 1, 15, 32, 2, quick=(1, 2), full=(1, 8), inner_steps=5),
    Case("fomaml_5w1s_mb32_1step", "maml", 5, 1, 15, 32, 2, quick=(1, 3), full=(2, 10), first_order=True),
    # The MAML Omniglot preset's shape: the paper's strided net, 1 query per class in training
    # (device.batch_tasks=auto runs the 32 tasks as the groups of grouped convolutions on CPU).
    Case("maml_stridednet_5w1s_mb32_1q", "maml", 5, 1, 1, 32, 2, quick=(2, 6), full=(3, 20), strided=True),
    # The MAML family on MAML's first case: ANIL (inner loop on the head only) and Meta-SGD (learned rates)
    Case("anil_5w1s_mb32_1step", "maml", 5, 1, 15, 32, 2, quick=(1, 3), full=(2, 10), algo="anil"),
    Case("metasgd_5w1s_mb32_1step", "maml", 5, 1, 15, 32, 2, quick=(1, 3), full=(2, 10), algo="metasgd"),
    # ProtoNet: 4 episodes per outer step; 15 queries for 5-way, 5 for 20-way (the eval shape of
    # the 20-way preset). Batch norm spans the whole batch, in the package and the reference.
    Case("protonet_5w5s", "protonet", 5, 5, 15, 4, 1, quick=(2, 10), full=(3, 30)),
    Case("protonet_20w1s", "protonet", 20, 1, 5, 4, 1, quick=(2, 10), full=(3, 30)),
    # The episode sampler alone on an Omniglot-sized split: 32 tasks per call; CPU only.
    Case("sampler", "sampler", 5, 1, 15, 32, 32, quick=(5, 40), full=(10, 200), devices=("cpu",)),
]
CASE_BY_NAME = {c.name: c for c in CASES}


def plugins() -> dict:
    """{workload: module} of scripts/bench_cases/ (the learners beyond MAML and ProtoNet); imported on
    first use, after this module is whole, and their cases added to CASES / CASE_BY_NAME."""
    import bench_cases

    found = bench_cases.load()
    for module in found.values():
        for case in module.CASES:
            if case.name not in CASE_BY_NAME:
                CASES.append(case)
                CASE_BY_NAME[case.name] = case
    return found


# ============================================================================= child side
# ----------------------------------------------------------------------------- plain reference net
def plain_conv4_cls():
    """Build the reference Conv4 class (torch is imported only in child processes)."""
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
            self.bn = nn.BatchNorm2d(c_out)

    class PlainConv4(nn.Module):
        """conv3x3 -> F.batch_norm(batch statistics) -> relu -> max_pool2d(2), four times, flattened,
        then an optional linear head. ``smooth=True``: softplus and avg_pool2d (the smooth twin)."""

        def __init__(self, in_ch: int, hidden: int, n_out: int | None, feature_dim: int, smooth: bool,
                     strided: bool = False) -> None:
            super().__init__()
            self.stride = 2 if strided else 1  # strided: the MAML Omniglot net, no pooling
            chans = [in_ch] + [hidden] * 4
            self.blocks = nn.ModuleList(Block(chans[i], chans[i + 1]) for i in range(4))
            self.head = nn.Linear(feature_dim, n_out) if n_out else None
            self.act = F.softplus if smooth else F.relu
            self.pool = F.avg_pool2d if smooth else F.max_pool2d

        def forward(self, x):
            for b in self.blocks:
                x = F.conv2d(x, b.conv.weight, b.conv.bias, stride=self.stride, padding=1)
                x = self.act(F.batch_norm(x, None, None, b.bn.weight, b.bn.bias, training=True, eps=b.bn.eps))
                x = x if self.stride == 2 else self.pool(x, 2)
            x = x.flatten(1)
            return self.head(x) if self.head is not None else x

    return PlainConv4


def make_weights(n_out: int | None, feature_dim: int, seed: int = SEED_WEIGHTS):
    """The shared initial weights, in Conv4 parameter order: (conv.weight, conv.bias, bn.weight,
    bn.bias) x 4, then (head.weight, head.bias). PyTorch's default init distributions."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    out, c_in = [], X_SHAPE[0]
    for _ in range(4):
        out += [uniform((HIDDEN, c_in, 3, 3), c_in * 9), uniform((HIDDEN,), c_in * 9),
                torch.ones(HIDDEN), torch.zeros(HIDDEN)]
        c_in = HIDDEN
    if n_out:
        out += [uniform((n_out, feature_dim), feature_dim), uniform((n_out,), feature_dim)]
    return out


def load_weights(module, weights, dtype=None) -> None:
    """Copy ``weights`` into ``module``'s parameters, in order; shapes must match."""
    import torch

    params = list(module.parameters())
    if len(params) != len(weights):
        raise RuntimeError(f"{type(module).__name__} has {len(params)} parameter tensors, expected {len(weights)}")
    with torch.no_grad():
        for (name, p), w in zip(module.named_parameters(), weights):
            if p.shape != w.shape:
                raise RuntimeError(f"parameter {name} has shape {tuple(p.shape)}, expected {tuple(w.shape)}")
            p.copy_(w.to(p.dtype if dtype is None else dtype))


# ----------------------------------------------------------------------------- data
def make_episodes(case: Case, tiny: bool, device, dtype=None):
    """The benchmark's tasks: the package's seeded sampler on its synthetic data (28x28, 1 channel)."""
    from fewshot_runner.data.sampler import EpisodeSampler
    from fewshot_runner.data.synthetic import Synthetic

    split = Synthetic(per_class=20, image_size=X_SHAPE[1], channels=X_SHAPE[0], seed=SEED_DATA).split("train")
    sampler = EpisodeSampler(split, case.n_way, case.n_shot, case.n_query, seed=SEED_EPISODES)
    return sampler.sample(case.batch(tiny)).to(device, dtype=dtype)


def omniglot_sized_split():
    """4112 classes x 20 random 28x28 uint8 images (Omniglot's size, with rotations)."""
    import torch

    from fewshot_runner.data.base import ClassSplit

    g = torch.Generator().manual_seed(SEED_DATA)
    images = torch.randint(0, 256, (4112, 20, *X_SHAPE), generator=g, dtype=torch.uint8)
    return ClassSplit.from_class_major("train", images, [f"c{i}" for i in range(4112)])


class NaiveSampler:
    """The reference sampler: per task, per class, Python ``random.sample`` and ``torch.stack`` of
    single images (what a straightforward TaskDataset does)."""

    def __init__(self, split, n_way: int, n_shot: int, n_query: int, seed: int) -> None:
        self.images = split.images
        self.by_class: list[list[int]] = [[] for _ in range(split.n_classes)]
        for i, c in enumerate(split.labels.tolist()):
            self.by_class[c].append(i)
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.rng = random.Random(seed)

    def sample(self, n_tasks: int):
        import torch

        from fewshot_runner.episode import Episode

        tasks = []
        for _ in range(n_tasks):
            sx, sy, qx, qy = [], [], [], []
            for label, c in enumerate(self.rng.sample(range(len(self.by_class)), self.n_way)):
                items = self.rng.sample(self.by_class[c], self.n_shot + self.n_query)
                sx += [self.images[i] for i in items[: self.n_shot]]
                qx += [self.images[i] for i in items[self.n_shot:]]
                sy += [label] * self.n_shot
                qy += [label] * self.n_query
            tasks.append((torch.stack(sx), torch.tensor(sy), torch.stack(qx), torch.tensor(qy)))
        sx, sy, qx, qy = (torch.stack(t) for t in zip(*tasks))
        return Episode(sx, sy, qx, qy, self.n_way)


# ----------------------------------------------------------------------------- reference algorithms
def ref_meta_loss(case: Case, net, params: dict, episodes, rates: dict | None = None):
    """The plain meta-objective, averaged over tasks.

    MAML: per task, ``inner_steps`` SGD steps on the support loss by ``functional_call`` +
    ``autograd.grad(create_graph=not first_order)``, then the query loss.  ANIL: the same steps on the
    head's weights alone; Meta-SGD: each weight's step scaled by its own learned rate (``rates``).
    ProtoNet: one forward of every image of the batch (batch norm over the batch, as the
    package), then per task: class means of the support embeddings, negative squared
    Euclidean distances, cross-entropy.
    """
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    losses = []
    if case.workload == "maml":
        for t in range(episodes.n_tasks):
            fast = params
            for _ in range(case.inner_steps):
                loss = F.cross_entropy(functional_call(net, fast, (episodes.support_x[t],)), episodes.support_y[t])
                adapted = [k for k in fast if case.algo != "anil" or k.startswith("head.")]
                grads = torch.autograd.grad(loss, [fast[k] for k in adapted], create_graph=not case.first_order)
                lr = (lambda k: rates[k]) if case.algo == "metasgd" else (lambda k: INNER_LR)
                fast = {**fast, **{k: fast[k] - lr(k) * g for k, g in zip(adapted, grads)}}
            losses.append(F.cross_entropy(functional_call(net, fast, (episodes.query_x[t],)), episodes.query_y[t]))
    else:
        T, S = episodes.n_tasks, episodes.support_x.shape[1]
        x = torch.cat([episodes.support_x, episodes.query_x], dim=1).flatten(0, 1)
        z = functional_call(net, params, (x,)).view(T, -1, HIDDEN)
        for t in range(T):
            zs, zq, ys = z[t, :S], z[t, S:], episodes.support_y[t]
            protos = torch.stack([zs[ys == c].mean(0) for c in range(episodes.n_way)])
            logits = -(zq[:, None, :] - protos[None, :, :]).pow(2).sum(-1)
            losses.append(F.cross_entropy(logits, episodes.query_y[t]))
    return torch.stack(losses).mean()


def build_reference(case: Case, device, dtype, smooth: bool):
    """(net, params dict of leaf tensors) with the shared initial weights."""
    n_out = case.n_way if case.workload == "maml" else None
    feature_dim = case.feature_dim
    net = plain_conv4_cls()(X_SHAPE[0], HIDDEN, n_out, feature_dim, smooth, case.strided).to(device=device, dtype=dtype)
    load_weights(net, make_weights(n_out, feature_dim))
    return net, dict(net.named_parameters())


def reference_rates(case: Case, params: dict) -> dict | None:
    """Meta-SGD's learned rates (leaf tensors, INNER_LR everywhere, as the package's inner_lr_init); else None."""
    import torch

    if case.algo != "metasgd":
        return None
    return {k: torch.full_like(p.detach(), INNER_LR).requires_grad_() for k, p in params.items()}


def load_package_weights(case: Case, algo) -> None:
    """The shared weights into the package learner; Meta-SGD's rates (``inner_lrs``) back to INNER_LR."""
    n_out = case.n_way if case.workload == "maml" else None
    weights = make_weights(n_out, case.feature_dim)
    if case.algo != "metasgd":
        return load_weights(algo, weights)
    load_weights(algo.net, weights)
    for rate in algo.inner_lrs.values():
        rate.data.fill_(INNER_LR)


def package_leaves(case: Case, algo) -> list:
    """The package learner's meta-parameters in the reference's order: the weights, then (Meta-SGD) the
    rate of each weight in the same order."""
    if case.algo != "metasgd":
        return list(algo.parameters())
    from fewshot_runner.algorithms.metasgd import rate_key

    names = [n for n, _ in algo.net.named_parameters()]
    return [*algo.net.parameters(), *(algo.inner_lrs[rate_key(n)] for n in names)]


def reference_step_fn(case: Case, device, tiny: bool) -> Callable[[], float]:
    import torch

    net, params = build_reference(case, device, torch.float32, smooth=False)
    rates = reference_rates(case, params)
    episodes = make_episodes(case, tiny, device)
    opt = torch.optim.Adam([*params.values(), *(rates or {}).values()], lr=OUTER_LR)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = ref_meta_loss(case, net, params, episodes, rates)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def reference_grads(case: Case, episodes, device, dtype, smooth: bool):
    import torch

    net, params = build_reference(case, device, dtype, smooth)
    rates = reference_rates(case, params)
    episodes = episodes.map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t)
    loss = ref_meta_loss(case, net, params, episodes, rates)
    leaves = (*params.values(), *(rates or {}).values())
    return [g.detach() for g in torch.autograd.grad(loss, leaves)]


# ----------------------------------------------------------------------------- fast path (the package)
def fused_ops_mode() -> tuple[str, str]:
    """("on", which kernels) when the package's fused op imports, else ("off", why).

    Builds (or loads from its cache) the op's C++ extension, so that the parent process pays
    the one-time compile before any child is timed.
    """
    try:
        import fewshot_runner.ops as ops
        from fewshot_runner.ops import bn_relu_pool  # noqa: F401
    except Exception as e:  # ImportError, or a half-written module
        return "off", f"{type(e).__name__}: {e}"[:200]
    load = getattr(ops, "load_extension", None)
    if load is None:
        return "on", ""
    try:
        loaded = load(warn=False) is not None
    except Exception as e:
        return "on", f"C++ kernels unavailable ({type(e).__name__}: {e})"[:200]
    if loaded:
        return "on", "C++ kernels on CPU"
    status = getattr(ops, "extension_status", lambda: {})()
    return "on", f"torch-ops fallback ({status.get('error')})"[:200]


def compose_learner(algo_name: str, device_type: str, threads: int, fused: str, precision: str,
                    overrides: tuple[str, ...] | list[str], x_shape: tuple[int, ...] = X_SHAPE):
    """(algo, runtime, cfg) of ``algo_name`` on the synthetic data (``x_shape``: 28x28 unless a plugin's case
    says, MANN's 20x20), built the way ``fewshot train`` builds them (``compose("train", ...)`` ->
    ``build_learner``); ``overrides`` give the shape and the rest."""
    from hydra import compose, initialize_config_dir

    import fewshot_runner.config  # noqa: F401  (registers the schemas)
    from fewshot_runner.cli import conf_dir
    from fewshot_runner.engine.device import resolve_runtime
    from fewshot_runner.engine.build import build_learner

    overrides = [f"algo={algo_name}", "data=synthetic", f"device={device_type}", f"device.fused_ops={fused}",
                 f"device.threads={threads}", f"device.precision={precision}", "logger=none", *overrides]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    runtime = resolve_runtime(cfg.device)
    algo = build_learner(cfg, x_shape, cfg.data.n_way, runtime)
    return algo, runtime, cfg


def package_learner(case: Case, device_type: str, threads: int, fused: str, precision: str = "fp32",
                    extra: tuple[str, ...] = ()):
    """(algo, runtime, cfg) built the way ``fewshot train`` builds them, with the shared weights."""
    algo_name = "protonet" if case.workload == "protonet" else ("fomaml" if case.first_order else case.algo)
    overrides = ["backbone=conv4", f"data.n_way={case.n_way}", f"data.n_shot={case.n_shot}",
                 f"data.n_query={case.n_query}", f"backbone.hidden={HIDDEN}",
                 f"backbone.pool={str(not case.strided).lower()}", f"train.outer_lr={OUTER_LR}", *extra]
    if case.workload == "maml":
        lr_key = "inner_lr_init" if case.algo == "metasgd" else "inner_lr"
        overrides += [f"algo.{lr_key}={INNER_LR}", f"algo.inner_steps={case.inner_steps}",
                      f"algo.first_order={str(case.first_order).lower()}"]
    algo, runtime, cfg = compose_learner(algo_name, device_type, threads, fused, precision, overrides)
    load_package_weights(case, algo)
    algo.train()
    return algo, runtime, cfg


def fast_step_fn(case: Case, algo, runtime, cfg, tiny: bool) -> Callable[[], float]:
    import torch

    from fewshot_runner.engine.outer_step import gradient_outer_step, step_helpers

    episodes = make_episodes(case, tiny, runtime.device)
    opt = torch.optim.Adam(algo.parameters(), lr=cfg.train.outer_lr)
    planner, graphed = step_helpers(algo, runtime, cfg.train)  # as fewshot train builds them

    def step() -> float:
        return gradient_outer_step(algo, opt, episodes, runtime, cfg.train.task_chunk, cfg.train.grad_clip,
                                   planner, graphed)["loss"]

    step.planner, step.graphed = planner, graphed

    return step


class _SmoothFunctional:
    """torch.nn.functional with relu -> softplus and max_pool2d -> avg_pool2d."""

    def __init__(self) -> None:
        import torch.nn.functional as F

        self._F = F
        self.relu = F.softplus
        self.max_pool2d = F.avg_pool2d

    def __getattr__(self, name):
        return getattr(self._F, name)


@contextlib.contextmanager
def package_smooth_twin():
    """The package's unfused Conv4 as its smooth twin, for the gradient check only."""
    from unittest import mock

    import fewshot_runner.backbones.conv as conv

    with mock.patch.object(conv, "F", _SmoothFunctional()):
        yield


def package_grads(case: Case, algo, runtime, episodes, dtype):
    import torch

    algo = algo.to(dtype)
    load_package_weights(case, algo)
    episodes = episodes.map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t)
    if dtype != torch.float32:  # (bf16 autocast: fp32 only)
        runtime = dataclasses.replace(runtime, autocast_dtype=None)
    # the engine's own outer step (task threads included), with an optimizer that moves nothing
    from fewshot_runner.engine.outer_step import gradient_outer_step

    gradient_outer_step(algo, torch.optim.SGD(algo.parameters(), lr=0.0), episodes, runtime, None, None)
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in package_leaves(case, algo)]


def relative_errors(got, ref) -> tuple[float, float]:
    """(max over tensors of ||got - ref|| / ||ref||, over tensors with a non-zero reference
    gradient; max ||got - ref|| / ||ref total|| over the tensors whose reference gradient is
    zero in exact arithmetic, i.e. below 1e-6 of the total)."""
    total = math.sqrt(sum(float(r.double().norm()) ** 2 for r in ref))
    worst, zero = 0.0, 0.0
    for g, r in zip(got, ref):
        diff = float((g.double() - r.double()).norm())
        rn = float(r.double().norm())
        if rn > 1e-6 * total:
            worst = max(worst, diff / rn)
        else:
            zero = max(zero, diff / total)
    return worst, zero


def gradient_check(case: Case, algo, runtime, fused: str, tiny: bool) -> dict:
    """grad_rel_err and friends (see the module docstring)."""
    import torch

    n_check = 1 if tiny else min(case.batch(tiny), 4)
    device = runtime.device
    episodes = make_episodes(case, tiny, device).tasks(0, n_check)
    smooth = fused == "off"
    twin = package_smooth_twin if smooth else contextlib.nullcontext
    ref64 = reference_grads(case, episodes, device, torch.float64, smooth)
    ref32 = reference_grads(case, episodes, device, torch.float32, smooth)
    with twin():
        fast32 = package_grads(case, algo, runtime, episodes, torch.float32)
        try:
            fast64 = package_grads(case, algo, runtime, episodes, torch.float64)
        except Exception as e:  # e.g. a fused kernel without a float64 version
            fast64, fp64_note = None, f"{type(e).__name__}: {e}"[:200]
        algo.to(torch.float32)
    err, zero_err = relative_errors(fast32, ref64)
    act, pool = ("softplus", "avg-pool") if smooth else ("relu", "max-pool")
    net = f"{'smooth twin' if smooth else 'real net'} ({act}{'' if case.strided else ', ' + pool})"
    out = {
        "grad_rel_err": err,
        "zero_grad_err": zero_err,
        "ref_grad_rel_err": relative_errors(ref32, ref64)[0],
        "grad_rel_err_vs_ref_fp32": relative_errors(fast32, ref32)[0],
        "grad_rel_err_fp64": relative_errors(fast64, ref64)[0] if fast64 is not None else None,
        "grad_check": f"{net}; fast fp32 vs plain reference fp64; first {n_check} tasks of the batch, initial weights",
        "grad_check_tasks": n_check,
    }
    if fast64 is None:
        out["grad_check_fp64_note"] = fp64_note
    return out


# ----------------------------------------------------------------------------- timing
def time_steps(step: Callable[[], object], warmup: int, iters: int, sync: Callable[[], None]) -> list[float]:
    """Milliseconds per call of ``step`` over ``iters`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
        sync()
    gc.collect()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    plugins()
    case = CASE_BY_NAME[args.case]
    device = torch.device(args.device)
    if device.type == "cuda":  # what the package's runtime sets, for both sides
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    out: dict = {"threads": torch.get_num_threads()}

    algo = runtime = None
    plugin = plugins().get(case.workload)
    if plugin is not None:  # a learner of scripts/bench_cases/: its module builds both sides and checks them
        if args.impl == "fast":
            fused, why = fused_ops_mode()
            out.update(fused_ops=fused, fused_ops_note=why, precision=args.precision)
            step, info = plugin.fast_step(case, device.type, args.threads, fused, args.precision, args.tiny)
            out.update(info)
            out["info_keys"] = list(info)  # (run_case copies them into the row)
        else:
            step = plugin.reference_step(case, device, args.tiny)
    elif case.workload == "sampler":
        from fewshot_runner.data.sampler import EpisodeSampler

        split = omniglot_sized_split()
        cls = EpisodeSampler if args.impl == "fast" else NaiveSampler
        sampler = cls(split, case.n_way, case.n_shot, case.n_query, seed=SEED_EPISODES)
        step = lambda: sampler.sample(case.meta_batch)  # noqa: E731
    elif args.impl == "fast":
        fused, why = fused_ops_mode()  # under bf16 autocast too: the fused ops then take the widened conv maps
        out["fused_ops"] = fused
        out["fused_ops_note"] = why
        out["precision"] = args.precision
        extra = (("device.cuda_graphs=on",) if args.cuda_graphs else ()) + \
            ((f"device.memory_cap_mb={args.memory_cap_mb}",) if args.memory_cap_mb else ())
        algo, runtime, cfg = package_learner(case, device.type, args.threads, fused, args.precision, extra)
        mode = getattr(algo, "batch_tasks", None)  # MAML: vmap over tasks (on CUDA with auto)
        out["batch_tasks"] = mode == "on" or (mode == "auto" and device.type == "cuda")
        step = fast_step_fn(case, algo, runtime, cfg, args.tiny)
        out["cuda_graphs"] = bool(args.cuda_graphs)
        out["memory_cap_mb"] = args.memory_cap_mb
    else:
        step = reference_step_fn(case, device, args.tiny)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out["times_ms"] = time_steps(step, args.warmup, args.iters, sync)
    graphed, planner = getattr(step, "graphed", None), getattr(step, "planner", None)
    if graphed is not None and graphed.failed:
        out["cuda_graphs_failed"] = graphed.failed
    if planner is not None:
        out["task_chunk"] = planner.chunk
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_mem_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_mem_kind"] = "process peak RSS"
    if args.check and algo is not None:
        out.update(gradient_check(case, algo, runtime, out["fused_ops"], args.tiny))
    elif args.check and plugin is not None and args.impl == "fast":
        out.update(plugin.check(case, args.tiny))
    return out


# ============================================================================= parent side
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def child_env(tuned_allocator: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    if tuned_allocator:
        env.update(ALLOCATOR_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(case: Case, impl: str, device: str, warmup: int, iters: int, args, tuned_allocator: bool,
          check: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--impl", impl, "--case", case.name, "--device", device,
           "--warmup", str(warmup), "--iters", str(iters), "--threads", str(args.threads),
           "--precision", args.precision]
    cmd += ["--tiny"] * args.tiny + ["--check"] * check
    if impl == "fast":
        cmd += ["--cuda-graphs"] * args.cuda_graphs + (["--memory-cap-mb", str(args.memory_cap_mb)]
                                                       if args.memory_cap_mb else [])
    proc = subprocess.run(cmd, env=child_env(tuned_allocator), capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"{case.name} {impl} on {device} exited with {proc.returncode}:\n{tail}")


def summarize(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "p25": q[0], "p75": q[2], "min": min(times), "max": max(times)}


def run_case(case: Case, device: str, args) -> dict:
    warmup, iters = case.quick if args.quick else case.full
    warmup = args.warmup if args.warmup is not None else warmup
    iters = args.iters if args.iters is not None else iters
    fast = spawn(case, "fast", device, warmup, iters, args, tuned_allocator=True, check=not args.no_check)
    ref = spawn(case, "ref", device, warmup, iters, args, tuned_allocator=True, check=False)
    ref_glibc = spawn(case, "ref", device, warmup, iters, args, tuned_allocator=False, check=False)
    f, r, rg = summarize(fast["times_ms"]), summarize(ref["times_ms"]), summarize(ref_glibc["times_ms"])
    n_tasks = case.batch(args.tiny)
    row = {
        "name": case.name, "device": device,
        "ms_per_it": f["median"], "ms_iqr": [f["p25"], f["p75"]], "ms_min": f["min"], "ms_max": f["max"],
        "ref_ms_per_it": r["median"], "ref_ms_iqr": [r["p25"], r["p75"]],
        "ref_glibc_ms_per_it": rg["median"], "ref_glibc_ms_iqr": [rg["p25"], rg["p75"]],
        "speedup": r["median"] / f["median"], "speedup_vs_glibc_ref": rg["median"] / f["median"],
        "tasks_per_s": n_tasks / (f["median"] / 1e3), "ref_tasks_per_s": n_tasks / (r["median"] / 1e3),
        "peak_mem_mb": fast["peak_mem_mb"], "ref_peak_mem_mb": ref["peak_mem_mb"],
        "ref_glibc_peak_mem_mb": ref_glibc["peak_mem_mb"], "peak_mem_kind": fast["peak_mem_kind"],
        "grad_rel_err": fast.get("grad_rel_err"),
        "meta_batch": n_tasks, "n_way": case.n_way, "n_shot": case.n_shot, "n_query": case.n_query,
        "inner_steps": case.inner_steps if case.workload == "maml" else None,
        "first_order": case.first_order if case.workload == "maml" else None,
        "warmup": warmup, "iters": iters, "threads": fast["threads"],
        "times_ms": fast["times_ms"], "ref_times_ms": ref["times_ms"], "ref_glibc_times_ms": ref_glibc["times_ms"],
    }
    for k in ("precision", "fused_ops", "fused_ops_note", "zero_grad_err", "ref_grad_rel_err", "grad_rel_err_fp64",
              "grad_rel_err_vs_ref_fp32",
              "grad_check", "grad_check_tasks", "grad_check_fp64_note", "cuda_graphs", "cuda_graphs_failed",
              "memory_cap_mb", "task_chunk", "loss_rel_err", "loss_rel_err_fp64", "check_note"):
        if k in fast:
            row[k] = fast[k]
    plugin = plugins().get(case.workload)
    if plugin is not None:
        row["fast_path"], row["reference"] = plugin.describe(case)
        row.update({k: fast[k] for k in fast.get("info_keys", ()) if k not in row})  # what fast_step's info says
        row["inner_steps"] = case.inner_steps if case.inner_steps > 1 else row["inner_steps"]
    elif case.workload == "sampler":
        row["fast_path"] = "EpisodeSampler.sample (tensor indexing)"
        row["reference"] = "per-task Python sampler (random.sample + torch.stack)"
    else:
        algo = case.workload if case.workload == "protonet" else case.algo
        row["fast_path"] = f"package {algo} via build_learner + gradient_outer_step, fused_ops={fast['fused_ops']}"
        row["reference"] = ("plain per-task functional_call loop, fp32, unfused" if case.workload == "maml"
                            else "plain batched forward, per-task prototype loop, fp32, unfused")
    return row


def fmt_ms(med: float, iqr) -> str:
    return f"{med:,.1f} [{iqr[0]:,.1f}–{iqr[1]:,.1f}]" if med < 100 else f"{med:,.0f} [{iqr[0]:,.0f}–{iqr[1]:,.0f}]"


def fmt_err(v) -> str:
    return "–" if v is None else f"{v:.1e}"


def print_table(console, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="fast path vs plain reference (median ms/it [IQR] over warm iterations)")
    for col, just in [("case", "left"), ("dev", "left"), ("fast ms/it", "right"), ("tasks/s", "right"),
                      ("ref ms/it", "right"), ("speed-up", "right"), ("ref glibc ms/it", "right"),
                      ("vs glibc", "right"), ("peak MB fast/ref", "right"), ("grad_rel_err", "right"),
                      ("ref fp32 / fast fp64", "right"), ("loss err fp32 / fp64", "right")]:
        table.add_column(col, justify=just)
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], r["device"], f"[red]failed: {r['error'].splitlines()[0][:60]}[/]",
                          *[""] * 9)
            continue
        table.add_row(
            r["name"], r["device"],
            fmt_ms(r["ms_per_it"], r["ms_iqr"]), f"{r['tasks_per_s']:,.1f}",
            fmt_ms(r["ref_ms_per_it"], r["ref_ms_iqr"]), f"{r['speedup']:.2f}x",
            fmt_ms(r["ref_glibc_ms_per_it"], r["ref_glibc_ms_iqr"]), f"{r['speedup_vs_glibc_ref']:.2f}x",
            f"{r['peak_mem_mb']:,.0f} / {r['ref_peak_mem_mb']:,.0f}",
            fmt_err(r["grad_rel_err"]), f"{fmt_err(r.get('ref_grad_rel_err'))} / {fmt_err(r.get('grad_rel_err_fp64'))}",
            "–" if "loss_rel_err" not in r else f"{fmt_err(r['loss_rel_err'])} / {fmt_err(r.get('loss_rel_err_fp64'))}",
        )
    console.print(table)


def run_parent(args) -> int:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        console = Console(width=180)
    plugins()
    names = [n.strip() for n in args.cases.split(",") if n.strip()] if args.cases else [c.name for c in CASES]
    unknown = [n for n in names if n not in CASE_BY_NAME]
    if unknown:
        console.print(f"[red]error:[/] unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASE_BY_NAME)}")
        return 2
    import torch

    devices = [d.strip() for d in args.devices.split(",")] if args.devices else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        console.print("[red]error:[/] --devices includes cuda but torch sees no CUDA GPU")
        return 2
    fused, why = fused_ops_mode()
    console.print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)   torch {torch.__version__}   "
                  f"threads: {args.threads} (both sides)   python {platform.python_version()}")
    if torch.cuda.is_available():
        console.print(f"GPU: {torch.cuda.get_device_name(0)}")
    console.print(f"fused ops: {fused}" + (f" ({why})" if why else "")
                  + f"   allocator: {' '.join(f'{k}={v}' for k, v in ALLOCATOR_ENV.items())} for fast and ref; "
                  f"ref also under glibc defaults   mode: {'quick' if args.quick else 'full'}"
                  + (f"   fast path precision: {args.precision} (autocast)" if args.precision != "fp32" else "")
                  + (" tiny" if args.tiny else ""))
    load = os.getloadavg()[0]
    if load > 0.5:
        console.print(f"[yellow]warning:[/] load average {load:.1f} before the start: other processes are "
                      "running, timings will be noisy (threads contend for the cores)")
    rows, t0 = [], time.time()
    for name in names:
        case = CASE_BY_NAME[name]
        for device in devices:
            if device not in case.devices:
                continue
            t_case, load = time.time(), os.getloadavg()[0]
            try:
                row = run_case(case, device, args)
                row["load_avg_1m"] = load
                console.print(f"  {name} on {device}: {row['ms_per_it']:.1f} ms/it, {row['speedup']:.2f}x "
                              f"({time.time() - t_case:.0f} s)")
            except RuntimeError as e:
                row = {"name": name, "device": device, "error": str(e)}
                console.print(f"[red]  {e}[/]")
            rows.append(row)
    print_table(console, rows)
    checks = sorted({r["grad_check"].split(";")[0] for r in rows if r.get("grad_check")})
    console.print(f"total {time.time() - t0:.0f} s. speed-up = ref median / fast median. grad_rel_err: fast "
                  f"{'fp32' if args.precision == 'fp32' else args.precision + ' autocast'} vs "
                  f"plain fp64 meta-gradient on the {' / '.join(checks) or '-'}; next column: the plain reference's "
                  "own fp32 error, and the fast path in fp64. peak MB: "
                  f"{rows[0].get('peak_mem_kind', '') if rows else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        console.print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer iterations (about 3 minutes on 2 cores)")
    p.add_argument("--json", metavar="FILE", help="write a JSON list, one object per (case, device)")
    plugins()
    p.add_argument("--cases", help=f"comma-separated subset of: {', '.join(CASE_BY_NAME)}")
    p.add_argument("--devices", help="comma-separated: cpu,cuda (default: cpu, and cuda when available)")
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads, both sides (default: all cores)")
    p.add_argument("--iters", type=int, help="timed iterations per run (overrides the per-case default)")
    p.add_argument("--warmup", type=int, help="untimed warm-up iterations per run (overrides the default)")
    p.add_argument("--tiny", action="store_true", help="shrink meta-batches (MAML 2 tasks, ProtoNet 1 episode); for tests")
    p.add_argument("--no-check", action="store_true", help="skip the meta-gradient check")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the fast path's device.precision (bf16: autocast, opt-in; the reference stays fp32)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the fast path with device.cuda_graphs=on (CUDA only; the reference stays eager)")
    p.add_argument("--memory-cap-mb", type=float, metavar="MIB",
                   help="the fast path with device.memory_cap_mb=MIB (chunks the meta-batch to stay under it)")
    # child mode
    p.add_argument("--impl", choices=["fast", "ref"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cuda_graphs and (not args.devices or "cpu" in args.devices.split(",")):
        p.error("--cuda-graphs needs --devices cuda")
    if args.threads < 1 or (args.iters is not None and args.iters < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--threads and --iters must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.impl:
        result = run_child(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
