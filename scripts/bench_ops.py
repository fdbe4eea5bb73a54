#!/usr/bin/env python
"""Time the fused bn_relu_pool against the unfused torch ops at MAML's Conv4 shapes.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        PYTHONPATH=src python scripts/bench_ops.py [--reps 15] [--dtype float32] [--backend ext|torch]

Three workloads per shape, all with inputs that require grad (as in training):
  fwd       the forward (building the autograd graph)
  fwd+bwd   forward, then grads of x, weight, bias for a random output gradient
  fwd+bwd+2 as in second-order MAML: those grads with create_graph=True (the output gradient also
            requires grad), then grads of x, weight, bias and the output gradient for random
            gradients of the first-order grads (the double backward)
Reports the median (and min) wall time in ms over --reps runs and the speed-up of the median.

``--stem``: the fused first layer (conv3x3 of 1-channel images + BN + ReLU + max-pool, ops/stem.py)
against the path it replaces (channels-last ``F.conv2d`` + the fused bn_relu_pool) on image
batches of 75 (MAML query), 5 (support) and 360 (60-way ProtoNet episode); gradients are taken
with respect to the conv weight and bias and the BN weight and bias (images need none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fewshot_runner.ops import bn_relu_pool, bn_relu_pool_reference, extension_status, load_extension  # noqa: E402
from fewshot_runner.ops.stem import conv_bn_relu_pool  # noqa: E402

STEM_SHAPES = [("MAML query 75 images", 75), ("MAML support 5 images", 5), ("ProtoNet 360 images", 360)]

SHAPES = [("query L1 75x64x28x28", (75, 64, 28, 28)), ("support L1 5x64x28x28", (5, 64, 28, 28)),
          ("query L2 75x64x14x14", (75, 64, 14, 14))]


def timeit(fn, reps: int) -> tuple[float, float]:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def workloads(op, shape, dtype, pool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=dtype, generator=g).requires_grad_()
    w = (torch.rand(shape[1], dtype=dtype, generator=g) + 0.5).requires_grad_()
    b = (torch.randn(shape[1], dtype=dtype, generator=g) * 0.1).requires_grad_()
    with torch.no_grad():
        out_shape = bn_relu_pool_reference(x, w, b, pool=pool).shape
    go = torch.randn(out_shape, dtype=dtype, generator=g).requires_grad_()
    rx = torch.randn(shape, dtype=dtype, generator=g)
    rw = torch.randn(shape[1], dtype=dtype, generator=g)
    rb = torch.randn(shape[1], dtype=dtype, generator=g)

    def fwd():
        return op(x, w, b, pool=pool)

    def fwd_bwd():
        return torch.autograd.grad(op(x, w, b, pool=pool), (x, w, b), go.detach())

    def fwd_bwd_2():
        gx, gw, gb = torch.autograd.grad(op(x, w, b, pool=pool), (x, w, b), go, create_graph=True)
        return torch.autograd.grad((gx, gw, gb), (x, w, go), (rx, rw, rb))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "fwd+bwd+2": fwd_bwd_2}


def stem_workloads(op, n, dtype):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(n, 1, 28, 28, dtype=dtype, generator=g)
    params = [(torch.randn(64, 1, 3, 3, dtype=dtype, generator=g) * 0.3).requires_grad_(),
              (torch.randn(64, dtype=dtype, generator=g) * 0.1).requires_grad_(),
              (torch.rand(64, dtype=dtype, generator=g) + 0.5).requires_grad_(),
              (torch.randn(64, dtype=dtype, generator=g) * 0.1).requires_grad_()]
    go = torch.randn(n, 64, 14, 14, dtype=dtype, generator=g).contiguous(memory_format=torch.channels_last)
    go.requires_grad_()
    rs = [torch.randn(p.shape, dtype=dtype, generator=g) for p in params]

    def fwd():
        return op(img, *params)

    def fwd_bwd():
        return torch.autograd.grad(op(img, *params), params, go.detach())

    def fwd_bwd_2():
        gw, _, gbw, gbb = torch.autograd.grad(op(img, *params), params, go, create_graph=True)
        # (the conv bias's gradient is exactly 0 under batch-statistics BN: the stem returns a constant)
        return torch.autograd.grad((gw, gbw, gbb), [params[0], params[2], go], (rs[0], rs[2], rs[3]))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "fwd+bwd+2": fwd_bwd_2}


def conv_then_fused(img, w, cb, bw, bb):
    """What ConvBlock ran before the stem op: channels-last conv, then the fused op's NHWC kernels."""
    x = torch.nn.functional.conv2d(img.to(memory_format=torch.channels_last),
                                   w.to(memory_format=torch.channels_last), cb, 1, 1)
    return bn_relu_pool(x, bw, bb, pool=True)


def print_table(first: str, ref_label: str, fused_label: str, cases, reps: int) -> None:
    """cases: (label, reference workloads, fused workloads); one row per label and workload."""
    width = max(18, len(ref_label) + 4)
    header = f"{first:<24}{'workload':<11}{ref_label:>{width}}{fused_label:>18}{'speed-up':>10}"
    print(header)
    print("-" * len(header))
    for label, ref, fus in cases:
        for name in ref:
            r_med, r_min = timeit(ref[name], reps)
            f_med, f_min = timeit(fus[name], reps)
            print(f"{label:<24}{name:<11}{r_med:>{width - 9}.2f} ({r_min:6.2f}){f_med:>9.2f} ({f_min:6.2f})"
                  f"{r_med / f_med:>9.2f}x")
    print("(median (min) over", reps, "runs)")


def main_stem(args, dtype) -> None:
    cases = ((label, stem_workloads(conv_then_fused, n, dtype), stem_workloads(conv_bn_relu_pool, n, dtype))
             for label, n in STEM_SHAPES)
    print_table("batch", "conv + fused op ms", "stem ms", cases, args.reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--backend", default=None, choices=["ext", "torch"], help="default: ext where it loads")
    ap.add_argument("--no-pool", action="store_true", help="BN + ReLU only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stem", action="store_true", help="time the fused first layer instead (see above)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pool = not args.no_pool

    t0 = time.perf_counter()
    ext = load_extension()
    t_load = time.perf_counter() - t0
    backend = args.backend or ("ext" if ext is not None else "torch")
    st = extension_status()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, pool={pool}, "
          f"backend={backend}, extension load {t_load:.1f} s ({'loaded' if st['loaded'] else st['error']})")
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if not malloc:
        print("note: MALLOC_MMAP_THRESHOLD_ is not set; glibc page faults make timings slower and noisier")
    if args.stem:
        if ext is None:
            raise SystemExit("error: --stem needs the C++ kernels")
        main_stem(args, dtype)
        return

    def fused(x, w, b, pool):
        return bn_relu_pool(x, w, b, pool=pool, backend=backend)

    cases = ((label, workloads(bn_relu_pool_reference, shape, dtype, pool), workloads(fused, shape, dtype, pool))
             for label, shape in SHAPES)
    print_table("shape", "reference ms", "fused ms", cases, args.reps)


if __name__ == "__main__":
    main()
