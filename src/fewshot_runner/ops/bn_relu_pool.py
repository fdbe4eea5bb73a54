"""Fused batch norm (batch statistics) -> ReLU -> 2x2 max-pool with exact first and second derivatives.

``bn_relu_pool(x, weight, bias, eps, pool)`` equals
``F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)), 2)``
(``pool=False``: without the max-pool), including its gradients and the gradients of its gradients
(second-order MAML).  The backward is itself an autograd Function whose backward (the double backward)
is written out in closed form, so each order is a few passes over memory instead of a dozen kernels.

Backends, picked per call:

* ``"ext"``: C++ kernels (``csrc/bn_relu_pool.cpp``): a few passes over memory per op, parallel over
  the (n, c) planes (NCHW) or the images (channels-last input: NHWC kernels, outputs and gradients
  channels-last too), on torch's thread pool, AVX-512 for the NCHW pooling where the CPU has it;
  compiled with ``torch.utils.cpp_extension.load`` on first use into a cache folder
  (``$FEWSHOT_OPS_CACHE``, else ``~/.cache/fewshot_runner/ops``).  CPU, float32 / float64.
* ``"torch"``: the same math in torch ops (CUDA tensors, other dtypes, inputs of torch.func transforms
  such as ``grad`` / ``vmap``, no compiler, or ``FEWSHOT_OPS_NO_EXT=1``).  A failed build warns once
  and falls back to it.

Math (per channel, over the M = N*H*W values; r = rstd, xhat = (x - mean) r, y = w xhat + b):
ReLU and max-pool route the pooled gradient gp to one position per window (the first maximum of y
in row-major order, when it is > 0): g = route(gp).  Backward:
``gx = w r (g - E[g] - xhat E[g xhat])``, ``gw = sum(g xhat)``, ``gb = sum(g)``.
Its backward, given ggx, ggw, ggb (ReLU / max-pool have zero second derivative, so the route is fixed):
``g_gp = route^T(w r (ggx - E[ggx] - xhat E[ggx xhat]) + ggw xhat + ggb)``,
``g_w = r B`` with ``B = sum(ggx g) - sum(ggx) E[g] - sum(ggx xhat) E[g xhat]``,
``g_x = r (a g + b ggx - E[h] - xhat (E[h xhat] + w B r / M))`` with ``h = a g + b ggx``,
``a = ggw - w r E[ggx xhat]``, ``b = -w r E[g xhat]``.
The double backward is not differentiable again (third order raises).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fewshot_runner.ops.functorch import is_transformed

__all__ = ["bn_relu_pool", "bn_relu_pool_reference", "extension_status", "load_extension", "update_running_stats"]

_CSRC = Path(__file__).with_name("csrc") / "bn_relu_pool.cpp"
_CSRC_INCLUDES = [Path(__file__).with_name("csrc") / "conv_bn_relu_pool.inc"]  # #included by _CSRC
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=256", "-fopenmp", "-fno-math-errno"]

_lock = threading.Lock()
_ext = None
_ext_tried = False
_ext_error: str | None = None


def bn_relu_pool_reference(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                           eps: float = 1e-5, pool: bool = True) -> torch.Tensor:
    """The unfused torch ops that ``bn_relu_pool`` computes (for tests and benchmarks)."""
    y = F.relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps))
    return F.max_pool2d(y, 2) if pool else y


# ----------------------------------------------------------------------------------- extension
def _cpu_tag() -> str:
    """Distinguishes CPUs in the build cache (the kernels are built with -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ext_name() -> str:
    h = hashlib.sha256()
    for part in (_CSRC.read_bytes(), *(f.read_bytes() for f in _CSRC_INCLUDES), torch.__version__.encode(), " ".join(_CFLAGS).encode(), _cpu_tag().encode(),
                 platform.python_version().encode()):
        h.update(part)
    return f"fewshot_bn_relu_pool_{h.hexdigest()[:12]}"


def _cache_dir() -> Path:
    root = os.environ.get("FEWSHOT_OPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fewshot_runner", "ops")
    return Path(root)


def _build():
    if os.environ.get("FEWSHOT_OPS_NO_EXT", "") not in ("", "0"):
        raise RuntimeError("disabled by FEWSHOT_OPS_NO_EXT")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not found)")
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" is noise here
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)

    name = _ext_name()
    build_dir = _cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # -fopenmp at compile time only: at::parallel_for then runs on torch's own OpenMP runtime
    # (resolved through libtorch_cpu), never a second copy of libgomp.
    return cpp_extension.load(name=name, sources=[str(_CSRC)], extra_cflags=_CFLAGS, build_directory=str(build_dir),
                              verbose=os.environ.get("FEWSHOT_OPS_VERBOSE", "") not in ("", "0"))


def load_extension(warn: bool = True):
    """The compiled kernels (building them on first call), or None with one warning when they can't be."""
    global _ext, _ext_tried, _ext_error
    if _ext_tried:
        return _ext
    with _lock:
        if not _ext_tried:
            try:
                _ext = _build()
            except Exception as e:  # no compiler, no ninja, a compile error, ...
                _ext_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                if warn and "FEWSHOT_OPS_NO_EXT" not in _ext_error:
                    warnings.warn("fewshot_runner.ops: the C++ kernels of bn_relu_pool are unavailable "
                                  f"({_ext_error}); using the slower torch-ops implementation.",
                                  RuntimeWarning, stacklevel=3)
            _ext_tried = True
    return _ext


def extension_status() -> dict:
    """{"loaded": bool, "error": str | None, "name": ..., "cache": ...} (does not build)."""
    return {"loaded": _ext is not None, "tried": _ext_tried, "error": _ext_error, "name": _ext_name(),
            "cache": str(_cache_dir())}


def _backend(x: torch.Tensor, weight, bias) -> str:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return "torch"
    if any(is_transformed(t) for t in (x, weight, bias)):  # the C++ kernels need plain storage
        return "torch"
    for t in (weight, bias):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            return "torch"
    return "ext" if load_extension() is not None else "torch"


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory layout the kernels run in for x: channels-last (NHWC, what oneDNN's fast
    convolutions produce) when x is so and not also plain-contiguous, else contiguous (NCHW).
    Outputs and gradients follow x's layout; the torch-ops backend always runs NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------- torch-ops backend
# route: pool -> (ind, alive): ind = flat argmax of y per window (int64), alive = max > 0;
#        no pool -> (alive,) with alive = y > 0.
def _sel(t: torch.Tensor, route, pool: bool) -> torch.Tensor:
    if not pool:
        return t
    ind = route[0]
    return t.flatten(2).gather(2, ind.flatten(2)).view_as(ind)


def _add_routed(out: torch.Tensor, v: torch.Tensor, route, pool: bool) -> torch.Tensor:
    if pool:
        out.flatten(2).scatter_add_(2, route[0].flatten(2), v.flatten(2))
    else:
        out.add_(v)
    return out


def _torch_forward(x, w, b, eps, pool):
    c = x.shape[1]
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    rstd = (var + eps).rsqrt()
    scale = rstd if w is None else w * rstd
    shift = -mean * scale if b is None else b - mean * scale
    y = torch.addcmul(shift.view(1, c, 1, 1), x, scale.view(1, c, 1, 1))
    if pool:
        ym, ind = F.max_pool2d(y, 2, return_indices=True)
        return ym.relu(), mean, rstd, (ind, ym > 0)
    return y.relu(), mean, rstd, (y > 0,)


def _torch_backward(gp, x, w, mean, rstd, route, pool):
    c = x.shape[1]
    shp = (1, c, 1, 1)
    m = x.numel() // c
    gpm = gp * route[-1]
    xc = x - mean.view(shp)
    sg = gpm.sum((0, 2, 3))
    sgd = (gpm * _sel(xc, route, pool)).sum((0, 2, 3))
    wr = rstd if w is None else w * rstd
    gx = xc * (-wr * rstd * rstd * sgd / m).view(shp) + (-wr * sg / m).view(shp)
    gx = _add_routed(gx, gpm * wr.view(shp), route, pool)
    return gx, sgd * rstd, sg


def _torch_double_backward(ggx, ggw, ggb, gp, x, w, mean, rstd, route, pool):
    c = x.shape[1]
    shp = (1, c, 1, 1)
    m = x.numel() // c
    dims = (0, 2, 3)
    alive = route[-1]
    gpm = gp * alive
    xc = x - mean.view(shp)
    xsel = _sel(xc, route, pool)
    sg = gpm.sum(dims)
    sgd = (gpm * xsel).sum(dims)
    zero = torch.zeros_like(mean)
    if ggx is not None:
        ggsel = _sel(ggx, route, pool)
        s1, s2, sgg = ggx.sum(dims), (ggx * xc).sum(dims), (gpm * ggsel).sum(dims)
    else:
        s1 = s2 = sgg = zero
    ggw = zero if ggw is None else ggw
    ggb = zero if ggb is None else ggb
    r = rstd
    wd = torch.ones_like(r) if w is None else w
    wr = wd * r
    e_ggx, e_ggxh, e_g, e_gh = s1 / m, r * s2 / m, sg / m, r * sgd / m
    bb = sgg - s1 * e_g - r * s2 * e_gh
    g_w = r * bb
    a = ggw - wr * e_ggxh
    b = -wr * e_gh
    e_h = e_g * a + b * e_ggx
    gam = e_gh * (ggw - 2.0 * wr * e_ggxh) + wd * bb * r / m
    g_x = xc * (-r * r * gam).view(shp) + (-r * e_h).view(shp)
    if ggx is not None:
        g_x = g_x + ggx * (r * b).view(shp)
    g_x = _add_routed(g_x, gpm * (r * a).view(shp), route, pool)
    g_gp = xsel * (r * a).view(shp) + (ggb - wr * e_ggx).view(shp)
    if ggx is not None:
        g_gp = g_gp + ggsel * wr.view(shp)
    g_gp = g_gp * alive
    return g_gp, g_x, g_w


# --------------------------------------------------------------------------- autograd Functions
class _BNReluPool(torch.autograd.Function):
    generate_vmap_rule = True  # (vmap runs the torch-ops backend)

    @staticmethod
    def forward(x, weight, bias, eps, pool, backend):
        if backend == "ext":
            return tuple(_ext.forward(x, weight, bias, eps, pool))  # out, mean, rstd, idx[, xsel]
        out, mean, rstd, route = _torch_forward(x, weight, bias, eps, pool)
        return (out, mean, rstd, *route)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, pool, backend = inputs
        _, mean, rstd, *route = output
        ctx.mark_non_differentiable(mean, rstd, *route)
        ctx.save_for_backward(x, weight, mean, rstd, *route)
        ctx.pool, ctx.backend = pool, backend
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gout, *_):
        if gout is None:
            return None, None, None, None, None, None
        x, weight, mean, rstd, *route = ctx.saved_tensors
        gx, gw, gb = _BNReluPoolBackward.apply(gout, x, weight, mean, rstd, ctx.pool, ctx.backend, *route)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None, None, None)


class _BNReluPoolBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(gp, x, weight, mean, rstd, pool, backend, *route):
        gp = gp.contiguous(memory_format=_layout(x))
        if backend == "ext":
            gx, gw, gb = _ext.backward(gp, x, weight, mean, rstd, route[0], route[1] if pool else None, pool, True)
            return gx, gw, gb
        return _torch_backward(gp, x, weight, mean, rstd, route, pool)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gp, x, weight, mean, rstd, pool, backend, *route = inputs
        ctx.save_for_backward(gp, x, weight, mean, rstd, *route)
        ctx.pool, ctx.backend, ctx.n_route = pool, backend, len(route)
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        gp, x, weight, mean, rstd, *route = ctx.saved_tensors
        need = ctx.needs_input_grad
        tail = (None,) * (4 + ctx.n_route)
        if ggx is None and ggw is None and ggb is None:
            return (None, None, None) + tail
        fmt = _layout(x)
        gp = gp.contiguous(memory_format=fmt)
        ggx = None if ggx is None else ggx.contiguous(memory_format=fmt)
        ggw, ggb = (None if t is None else t.contiguous() for t in (ggw, ggb))
        if ctx.backend == "ext":
            g_gp, g_x, g_w = _ext.double_backward(ggx, ggw, ggb, gp, x, weight, mean, rstd, route[0],
                                                  route[1] if ctx.pool else None, ctx.pool,
                                                  need[0], need[1], need[2] and weight is not None)
        else:
            g_gp, g_x, g_w = _torch_double_backward(ggx, ggw, ggb, gp, x, weight, mean, rstd, route, ctx.pool)
        return ((g_gp if need[0] else None), (g_x if need[1] else None),
                (g_w if need[2] and weight is not None else None)) + tail


def bn_relu_pool(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 eps: float = 1e-5, pool: bool = True, *, backend: str | None = None,
                 return_stats: bool = False):
    """``max_pool2d(relu(batch_norm(x, weight, bias, training=True, eps)), 2)`` as one op.

    x: (N, C, H, W); weight, bias: (C,) or None.  Batch statistics (biased variance), no running
    statistics.  ``pool=False`` leaves out the 2x2 max-pool (floor semantics for odd H / W, ties go to the
    first maximum in row-major order, as ``F.max_pool2d``).  Exact first and second derivatives with
    respect to x, weight and bias.  backend: None (C++ kernels where they apply, else torch ops),
    "torch" (force the torch-ops implementation) or "ext" (require the C++ kernels).
    return_stats=True returns ``(out, mean, var)``: the per-channel batch mean and biased variance
    (detached), which a caller keeping running statistics needs (see ``update_running_stats``).
    A bf16 / fp16 x with fp32 (or no) weights, such as a convolution's output under bf16 autocast, is
    widened first: batch norm runs in fp32 (the C++ kernels where they apply) and the output is fp32.
    """
    if x.dim() != 4:
        raise ValueError(f"bn_relu_pool expects a 4-d (N, C, H, W) input, got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"bn_relu_pool: {name} must have shape ({c},), got {tuple(t.shape)}")
    if pool and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"bn_relu_pool: input {tuple(x.shape)} too small for a 2x2 max-pool")
    if x.dtype in (torch.bfloat16, torch.float16) and all(t is None or t.dtype == torch.float32 for t in (weight, bias)):
        x = x.float()
    if backend is None:
        backend = _backend(x, weight, bias)
    elif backend == "ext":
        if _backend(x, weight, bias) != "ext":
            raise RuntimeError(f"bn_relu_pool: the C++ kernels can't run this call ({x.device}, {x.dtype}; "
                               f"extension error: {_ext_error})")
    elif backend != "torch":
        raise ValueError(f"bn_relu_pool: backend must be None, 'ext' or 'torch', got {backend!r}")
    x = x.contiguous(memory_format=_layout(x) if backend == "ext" else torch.contiguous_format)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    out, mean, rstd, *_ = _BNReluPool.apply(x, weight, bias, float(eps), bool(pool), backend)
    if not return_stats:
        return out
    return out, mean.detach(), batch_variance(rstd, eps)


def batch_variance(rstd: torch.Tensor, eps: float) -> torch.Tensor:
    """The biased batch variance behind ``rstd = 1 / sqrt(var + eps)`` (detached)."""
    return (rstd.detach().double().pow(-2) - float(eps)).clamp_min(0).to(rstd.dtype)


def update_running_stats(bn: torch.nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                         n: int) -> None:
    """What ``F.batch_norm(training=True)`` does to ``bn``'s buffers, given the batch mean and biased
    variance over ``n`` values per channel: momentum (or cumulative, momentum=None) averages, with the
    unbiased variance, and ``num_batches_tracked += 1``."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    with torch.no_grad():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased = var * (n / max(n - 1, 1))
        bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
