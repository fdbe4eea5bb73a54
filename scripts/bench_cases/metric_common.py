"""What the bench cases of the metric, pair, class-batch and memory learners share (bench_cases/metric.py,
bench_cases/memory.py): one :class:`Workload` per learner, the shared weights, the package's step and the check.

Both sides of a case start from the same weights and step on the same batch:

* weights: a workload's ``spec(case)`` lists the package's parameters, ``(package name, shape, low, high)``
  (uniform in [low, high] from one generator seeded with ``bench.SEED_WEIGHTS``, in list order: PyTorch's
  default bounds, batch norm at 1 / 0); the package learner must have exactly these parameters, and the
  reference names, for each parameter of its own, the package parameter it takes (same values, its own shape);
* the batch: the package's from ``algo.batch_source(split, ...)`` (seeded with ``bench.SEED_EPISODES``), the
  reference's from the same data-layer source built directly (``Workload.source``); the check says whether the
  two are identical (``check_note``).  The split: Omniglot's size, 4112 training classes (with rotations) x 20
  images of uniform random pixels (``train_split``): Baseline's head is as wide as on Omniglot, and max-pool
  windows hold no exact ties.  (On images with flat regions, the synthetic data's or Omniglot's, equal conv
  outputs tie in a window, and fp32 rounding breaks the tie one way in the fused / channels-last kernels and
  another in the plain NCHW ones: both valid subgradients, but the first layers' fp32 gradients then differ by
  ~7e-4 (measured on Matching Networks) and the check would measure tie-breaking, not error.)

The package side is built by ``bench.compose_learner`` (``fewshot train``'s configs, ``device.fused_ops`` and
channels-last as resolved there), its optimizer by ``engine.build.make_optimizer`` and it is stepped by the
learner's own ``outer_step`` or ``engine.outer_step.gradient_outer_step`` (``train.grad_clip`` included), as the
training loop steps it.  Data augmentation (Siamese's ``data.augment.affine``) is the loop's ``next_batch``, not
the step, and is left out of both sides.  The batch is drawn once and stepped on repeatedly, on both sides.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import bench

Spec = list  # [(package parameter name, shape, low, high)]

# The device and precision the fast step ran with in this child process (bench.run_child calls check after it):
# the check's too (its fp32 side under bf16 autocast when the timed path ran so; its float64 side never).
_RAN_ON = {"device_type": "cpu", "precision": "fp32"}


@dataclass(frozen=True)
class Workload:
    """One learner's bench recipe.

    algo: the ``algo=`` config; backbone: the ``backbone=`` config; spec(case): the parameters (module
    docstring); source(case, split): the data-layer batch source of the reference (the package's
    ``batch_source`` must give the same batches); reference(case): the plain reference, an ``nn.Module`` with
    ``loss(batch) -> scalar`` and ``package_names: {own parameter name: package parameter name}``;
    image_size: the square images' side; grad_clip: the reference's gradient-norm clip (the package's is its
    config's ``train.grad_clip``); fast_path, reference_text: the result row's lines.
    """

    algo: str
    backbone: str
    spec: Callable
    source: Callable
    reference: Callable
    fast_path: str
    reference_text: str
    image_size: int = 28
    grad_clip: float | None = None


def backbone_spec(c_in: int = 1, hidden: int = bench.HIDDEN, prefix: str = "backbone.blocks") -> Spec:
    """The package's Conv4 / relation_conv4 (``{prefix}.{i}.conv|bn.weight|bias``), PyTorch's default bounds."""
    out = []
    for i in range(4):
        bound = (c_in * 9) ** -0.5
        out += [(f"{prefix}.{i}.conv.weight", (hidden, c_in, 3, 3), -bound, bound),
                (f"{prefix}.{i}.conv.bias", (hidden,), -bound, bound),
                (f"{prefix}.{i}.bn.weight", (hidden,), 1.0, 1.0), (f"{prefix}.{i}.bn.bias", (hidden,), 0.0, 0.0)]
        c_in = hidden
    return out


def easyfsl_conv4(pool_blocks: int = 4, c_in: int = 1, hidden: int = bench.HIDDEN):
    """The usual Conv4 (easyfsl's / the papers'): four nn.Sequential(Conv2d 3x3 pad 1, BatchNorm2d, ReLU,
    MaxPool2d(2)) blocks, the last ``4 - pool_blocks`` without the pool.  (N, c_in, H, W) -> feature maps."""
    from torch import nn

    blocks = []
    for i in range(4):
        layers = [nn.Conv2d(c_in, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU()]
        blocks.append(nn.Sequential(*layers, *([nn.MaxPool2d(2)] if i < pool_blocks else [])))
        c_in = hidden
    return nn.Sequential(*blocks)


def easyfsl_conv4_names(prefix: str, package_prefix: str = "backbone.blocks") -> dict[str, str]:
    """{easyfsl_conv4 parameter name under ``prefix``: the package Conv4's}."""
    out = {}
    for i in range(4):
        for own, pkg in (("0.weight", "conv.weight"), ("0.bias", "conv.bias"), ("1.weight", "bn.weight"),
                         ("1.bias", "bn.bias")):
            out[f"{prefix}.{i}.{own}"] = f"{package_prefix}.{i}.{pkg}"
    return out


# ----------------------------------------------------------------------------- weights
def make_named_weights(spec: Spec) -> dict:
    """{package name: fp32 tensor} of ``spec``, uniform in [low, high], one generator for the whole list."""
    import torch

    g = torch.Generator().manual_seed(bench.SEED_WEIGHTS)
    return {name: low + (high - low) * torch.rand(shape, generator=g) for name, shape, low, high in spec}


def load_package(algo, spec: Spec) -> None:
    """The shared weights into the package learner; its parameters must be exactly the spec's."""
    import torch

    weights = make_named_weights(spec)
    params = dict(algo.named_parameters())
    if set(params) != set(weights) or any(tuple(params[k].shape) != tuple(w.shape) for k, w in weights.items()):
        raise RuntimeError(f"{type(algo).__name__}'s parameters "
                           f"{sorted((k, tuple(p.shape)) for k, p in params.items())} are not the bench spec's "
                           f"{sorted((k, tuple(w.shape)) for k, w in weights.items())}")
    with torch.no_grad():
        for k, w in weights.items():
            params[k].copy_(w)


def load_reference(ref, spec: Spec) -> None:
    """The shared weights into the reference, through its ``package_names`` (each parameter once)."""
    import torch

    weights = make_named_weights(spec)
    params = dict(ref.named_parameters())
    if set(ref.package_names) != set(params) or sorted(ref.package_names.values()) != sorted(weights):
        raise RuntimeError(f"{type(ref).__name__}.package_names does not pair its parameters with the spec's")
    with torch.no_grad():
        for own, pkg in ref.package_names.items():
            params[own].copy_(weights[pkg].reshape(params[own].shape))


# ----------------------------------------------------------------------------- batches
OMNIGLOT_TRAIN_CLASSES = 4112


def train_split(work: Workload):
    """The split batches are drawn from (module docstring): 4112 classes x 20 uniform random uint8 images of
    (1, image_size, image_size), seeded (``bench.omniglot_sized_split``'s recipe at any size)."""
    return _random_split(work.image_size)


@functools.lru_cache(maxsize=2)
def _random_split(image_size: int):
    import torch

    from fewshot_runner.data.base import ClassSplit

    g = torch.Generator().manual_seed(bench.SEED_DATA)
    shape = (OMNIGLOT_TRAIN_CLASSES, 20, bench.X_SHAPE[0], image_size, image_size)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return ClassSplit.from_class_major("train", images, [f"c{i}" for i in range(OMNIGLOT_TRAIN_CLASSES)])


def reference_batch(case, work: Workload, tiny: bool, device, dtype=None):
    """The reference's batch: the data-layer source itself, seeded as the package's."""
    return work.source(case, train_split(work)).sample(case.batch(tiny)).to(device, dtype=dtype)


def same_batch(a, b) -> bool:
    """Whether two batches (dataclasses of tensors and ints) hold identical values."""
    import dataclasses

    import torch

    fa, fb = dataclasses.asdict(a), dataclasses.asdict(b)
    return fa.keys() == fb.keys() and all(
        torch.equal(x, fb[k]) if isinstance(x, torch.Tensor) else x == fb[k] for k, x in fa.items())


# ----------------------------------------------------------------------------- the package side
def package_side(case, work: Workload, device_type: str, threads: int, fused: str, precision: str, tiny: bool):
    """(algo, runtime, cfg, batch): the learner as ``fewshot train`` builds it, its batch from its own
    ``batch_source`` (which may size the learner: Baseline's head), then the shared weights, in train mode."""
    overrides = [f"backbone={work.backbone}", f"data.n_way={case.n_way}", f"data.n_shot={case.n_shot}",
                 f"data.n_query={case.n_query}", f"train.meta_batch_size={case.batch(tiny)}",
                 f"train.outer_lr={bench.OUTER_LR}", *case.overrides]
    x_shape = (bench.X_SHAPE[0], work.image_size, work.image_size)
    algo, runtime, cfg = bench.compose_learner(work.algo, device_type, threads, fused, precision, overrides,
                                               x_shape=x_shape)
    source = algo.batch_source(train_split(work), case.n_way, case.n_shot, case.n_query, seed=bench.SEED_EPISODES)
    batch = source.sample(case.batch(tiny)).to(runtime.device)
    load_package(algo, work.spec(case))
    algo.train()
    return algo, runtime, cfg, batch


def fast_step(case, work: Workload, device_type: str, threads: int, fused: str, precision: str, tiny: bool):
    """(step, info): one training step of the package, as the training loop takes it (engine/loop.py)."""
    from fewshot_runner.engine.build import make_optimizer
    from fewshot_runner.engine.outer_step import gradient_outer_step, step_helpers

    algo, runtime, cfg, batch = package_side(case, work, device_type, threads, fused, precision, tiny)
    _RAN_ON.update(device_type=device_type, precision=precision)
    opt = make_optimizer(cfg, algo)
    planner, graphed = step_helpers(algo, runtime, cfg.train)
    own = algo.has_own_outer_step()

    def step() -> float:
        if own:
            return algo.outer_step(batch, opt)["loss"]
        return gradient_outer_step(algo, opt, batch, runtime, cfg.train.task_chunk, cfg.train.grad_clip,
                                   planner, graphed)["loss"]

    info = {"channels_last": runtime.channels_last, "batch_kind": type(batch).__name__,
            "grad_clip": cfg.train.grad_clip, "optimizer": type(opt).__name__}
    return step, info


def reference_step(case, work: Workload, device, tiny: bool):
    """The plain reference's training step (fp32, Adam at ``bench.OUTER_LR``) on the same batch and weights."""
    import torch

    ref = work.reference(case).to(device)
    load_reference(ref, work.spec(case))
    ref.train()
    batch = reference_batch(case, work, tiny, device)
    opt = torch.optim.Adam(ref.parameters(), lr=bench.OUTER_LR)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = ref.loss(batch)
        loss.backward()
        if work.grad_clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), work.grad_clip)
        opt.step()
        return float(loss.detach())

    return step


# ----------------------------------------------------------------------------- the check
def package_loss_grads(algo, runtime, batch, spec: Spec, dtype):
    """(loss, gradients in spec order) of the package's own outer step (no clip, an optimizer that moves
    nothing) on ``batch`` in ``dtype``, from the shared weights."""
    import dataclasses

    import torch

    from fewshot_runner.engine.outer_step import gradient_outer_step

    algo = algo.to(dtype)
    load_package(algo, spec)
    batch = batch.to(runtime.device, dtype=dtype)
    if dtype != torch.float32:
        runtime = dataclasses.replace(runtime, autocast_dtype=None)
    metrics = gradient_outer_step(algo, torch.optim.SGD(algo.parameters(), lr=0.0), batch, runtime, None, None)
    params = dict(algo.named_parameters())
    grads = [torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad.detach().clone()
             for n, *_ in spec]
    return metrics["loss"], grads


def reference_loss_grads(case, work: Workload, batch, spec: Spec, device, dtype):
    """(loss, gradients in spec order, each in the package's shape) of the reference on ``batch``."""
    import torch

    ref = work.reference(case).to(device=device, dtype=dtype)
    load_reference(ref, spec)
    ref.train()
    loss = ref.loss(batch.to(device, dtype=dtype))
    own = dict(ref.named_parameters())
    by_pkg = {pkg: name for name, pkg in ref.package_names.items()}
    grads = torch.autograd.grad(loss, [own[by_pkg[n]] for n, *_ in spec], allow_unused=True)
    grads = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g.detach().reshape(shape)
             for g, (_, shape, *_) in zip(grads, spec)]
    return float(loss.detach()), grads


def check(case, work: Workload, tiny: bool) -> dict:
    """The package against the reference on the same weights and batch, in fp32 and in float64: the first
    step's loss (``loss_rel_err``, ``loss_rel_err_fp64``) and gradients (bench.py's ``grad_rel_err`` family)."""
    import torch

    fused, _ = bench.fused_ops_mode()
    algo, runtime, _, batch = package_side(case, work, _RAN_ON["device_type"], torch.get_num_threads(), fused,
                                           _RAN_ON["precision"], tiny)
    device = runtime.device
    matches = same_batch(batch, reference_batch(case, work, tiny, device))
    spec = work.spec(case)
    loss32, fast32 = package_loss_grads(algo, runtime, batch, spec, torch.float32)
    loss64, fast64 = package_loss_grads(algo, runtime, batch, spec, torch.float64)
    ref_loss32, ref32 = reference_loss_grads(case, work, batch, spec, device, torch.float32)
    ref_loss64, ref64 = reference_loss_grads(case, work, batch, spec, device, torch.float64)
    err, zero_err = bench.relative_errors(fast32, ref64)
    return {
        "loss_rel_err": abs(loss32 - ref_loss32) / abs(ref_loss32),
        "loss_rel_err_fp64": abs(loss64 - ref_loss64) / abs(ref_loss64),
        "grad_rel_err": err, "zero_grad_err": zero_err,
        "ref_grad_rel_err": bench.relative_errors(ref32, ref64)[0],
        "grad_rel_err_vs_ref_fp32": bench.relative_errors(fast32, ref32)[0],
        "grad_rel_err_fp64": bench.relative_errors(fast64, ref64)[0],
        "grad_check": f"real net; fast {_RAN_ON['precision']} vs plain reference fp64; the whole batch "
                      f"({case.batch(tiny)}), "
                      f"initial weights; fused_ops={fused}, channels_last={runtime.channels_last}",
        "check_note": "loss and gradients of the first step; the package's batch from its batch_source "
                      + ("equals" if matches else "DIFFERS FROM") + " the reference's",
    }


def plugin_functions(workloads: dict):
    """The four functions of a family module (bench_cases/__init__.py) over its ``workloads``:
    ``reference_step, fast_step, check, describe = plugin_functions(WORKLOADS)``."""

    def reference_step_of(case, device, tiny: bool):
        return reference_step(case, workloads[case.workload], device, tiny)

    def fast_step_of(case, device_type: str, threads: int, fused: str, precision: str, tiny: bool):
        return fast_step(case, workloads[case.workload], device_type, threads, fused, precision, tiny)

    def check_of(case, tiny: bool) -> dict:
        return check(case, workloads[case.workload], tiny)

    def describe(case) -> tuple[str, str]:
        work = workloads[case.workload]
        return work.fast_path + (f" ({', '.join(case.overrides)})" if case.overrides else ""), work.reference_text

    return reference_step_of, fast_step_of, check_of, describe
