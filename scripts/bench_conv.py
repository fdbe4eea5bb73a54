"""How fast this CPU runs Conv4's 64 -> 64 convolutions, call by call, and the weight gradient's
reformulations: the figures behind docs/speed.md's "AMD EPYC without AVX-512" section.

    python scripts/bench_conv.py                     # 75 images (a MAML query) at 14x14 and 7x7
    python scripts/bench_conv.py --batch 75 600 --size 14 7

Each row is the median of --iters calls after 2 warm-ups, 3x3 kernels, padding 1, NHWC (channels-
last) tensors as the fast path runs them, in fp32, on torch's intra-op threads (--threads). GFLOP/s
counts 2 FLOPs per multiply-add of the direct convolution, so a reformulation's figure is
comparable to the call it replaces. Every reformulation is checked against torch's result first;
the Winograd rows time only the GEMMs that algorithm would run, a lower bound on its time.
Run it with the allocator tuned as the ``fewshot`` launcher does (``make bench`` does; or prefix
MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=100000000000).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from bench_ops import timeit  # scripts/ is on sys.path when this runs as a script

CL = torch.channels_last


def conv_backward(gy, x, w, mask):
    return torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)


def weight_grad_im2col(x_pad_nhwc: torch.Tensor, gy_rows: torch.Tensor, n: int, h: int) -> torch.Tensor:
    """(C_out, C_in, 3, 3) weight gradient as im2col of the padded NHWC input + one mm."""
    c = x_pad_nhwc.shape[-1]
    cols = x_pad_nhwc.new_empty(n, h, h, 3, 3, c)
    for kh in range(3):
        for kw in range(3):
            cols[:, :, :, kh, kw, :] = x_pad_nhwc[:, kh:kh + h, kw:kw + h, :]
    return gy_rows.t().mm(cols.view(n * h * h, 9 * c)).view(-1, 3, 3, c).permute(0, 3, 1, 2)


def weight_grad_shifted(x_flat: torch.Tensor, gy_pad_flat: torch.Tensor, width: int) -> torch.Tensor:
    """The same as 9 mms over the flattened padded grid: the zero border of the padded output
    gradient makes each kernel offset one contiguous shifted slice of the padded input."""
    c_out, c_in = gy_pad_flat.shape[1], x_flat.shape[1]
    out = x_flat.new_empty(c_out, 3, 3, c_in)
    lo, hi = width + 1, x_flat.shape[0] - width - 1
    for kh in range(3):
        for kw in range(3):
            s = (kh - 1) * width + (kw - 1)
            out[:, kh, kw, :] = gy_pad_flat[lo:hi].t().mm(x_flat[lo + s:hi + s])
    return out.permute(0, 3, 1, 2)


def rows_for(n: int, h: int, channels: int, iters: int) -> list[tuple[str, float, float]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, h, h, generator=g).to(memory_format=CL)
    w = torch.randn(channels, channels, 3, 3, generator=g).to(memory_format=CL)
    gy = torch.randn(n, channels, h, h, generator=g).to(memory_format=CL)
    gflop = 2 * n * channels * channels * 9 * h * h / 1e9
    gw_ref = conv_backward(gy, x, w, [False, True, False])[1]
    gx_ref = conv_backward(gy, x, w, [True, False, False])[0]

    w_flip = w.flip(2, 3).transpose(0, 1).contiguous(memory_format=CL)
    x_pad = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()
    gy_rows = gy.permute(0, 2, 3, 1).reshape(n * h * h, channels)
    gy_pad = F.pad(gy.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous().view(-1, channels)
    x_flat = x_pad.view(-1, channels)

    for name, got, want in (("flipped-weight input gradient", F.conv2d(gy, w_flip, padding=1), gx_ref),
                            ("im2col weight gradient", weight_grad_im2col(x_pad, gy_rows, n, h), gw_ref),
                            ("shifted weight gradient", weight_grad_shifted(x_flat, gy_pad, h + 2), gw_ref)):
        if (got - want).abs().max().item() > 1e-4 * want.abs().max().item():
            raise SystemExit(f"error: the {name} disagrees with torch's; its timing would mean nothing")

    timed = [
        ("forward", lambda: F.conv2d(x, w, padding=1)),
        ("backward, input gradient", lambda: conv_backward(gy, x, w, [True, False, False])),
        ("backward, weight gradient", lambda: conv_backward(gy, x, w, [False, True, False])),
        ("backward, both", lambda: conv_backward(gy, x, w, [True, True, False])),
        ("input gradient as a forward conv of the flipped weights", lambda: F.conv2d(gy, w_flip, padding=1)),
        ("weight gradient, NCHW tensors", lambda: conv_backward(gy.contiguous(), x.contiguous(), w.contiguous(),
                                                                 [False, True, False])),
        ("weight gradient as im2col + mm", lambda: weight_grad_im2col(x_pad, gy_rows, n, h)),
        ("weight gradient as 9 shifted mms", lambda: weight_grad_shifted(x_flat, gy_pad, h + 2)),
    ]
    # Winograd F(2x2, 3x3) would do these 16 batched GEMMs (one per point of a 4x4 tile) plus its
    # transforms: the GEMMs alone are a lower bound on its time (random data, nothing to check)
    tiles = n * ((h + 1) // 2) ** 2
    v, u = torch.randn(16, tiles, channels, generator=g), torch.randn(16, channels, channels, generator=g)
    vt, m = torch.randn(16, channels, tiles, generator=g), torch.randn(16, tiles, channels, generator=g)
    timed += [("Winograd F(2x2,3x3) forward: its 16 GEMMs alone, no transforms", lambda: torch.bmm(v, u)),
              ("Winograd F(2x2,3x3) weight gradient: its 16 GEMMs alone", lambda: torch.bmm(vt, m))]
    out = []
    for name, fn in timed:
        ms = timeit(fn, iters)[0]
        work = 2 * gflop if name == "backward, both" else gflop
        out.append((name, ms, work / ms * 1e3))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[75])
    p.add_argument("--size", type=int, nargs="+", default=[14, 7])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    table = Table(title=f"{args.channels} -> {args.channels} 3x3 convolutions, fp32 NHWC, {args.threads} threads "
                        f"(median of {args.iters})")
    for col, just in (("images", "right"), ("map", "right"), ("call", "left"), ("ms", "right"),
                      ("GFLOP/s", "right")):
        table.add_column(col, justify=just)
    for n in args.batch:
        for h in args.size:
            for name, ms, rate in rows_for(n, h, args.channels, args.iters):
                table.add_row(str(n), f"{h}x{h}", name, f"{ms:.2f}", f"{rate:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
