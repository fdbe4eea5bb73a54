"""Device and precision, resolved once per run."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass

import torch

from fewshot_runner.errors import UserError


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool
    compile: bool = False  # torch.compile where the learner supports it (see build_learner)
    task_threads: int = 1  # worker threads over the tasks of a meta-batch (CPU, see run.task_threads_for)
    cuda_graphs: bool = False  # the training step's forward + backward as one CUDA graph (engine/graphs.py)
    memory_cap_mb: float | None = None  # chunk meta-batches to stay under it (engine/memory.py)
    precision_note: str = ""  # how device.precision=auto chose, for the run's log and results.json

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def autocast(self, cache_enabled: bool = True):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache_enabled)


def resolve_runtime(cfg) -> Runtime:
    """cfg: the ``device`` config node."""
    kind = cfg.type
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible to torch; use device=cpu or device=auto")
    if kind not in ("cpu", "cuda"):
        raise UserError(f"device.type={cfg.type!r} is not one of auto, cpu, cuda")
    if cfg.precision not in ("fp32", "bf16", "auto"):
        raise UserError(f"device.precision={cfg.precision!r} is not one of fp32, bf16, auto")
    channels_last = _switch(cfg.get("channels_last", "off"), "device.channels_last")
    if channels_last == "auto":  # measured on CPU (docs/speed.md); unmeasured on GPUs, so off there
        channels_last = "on" if kind == "cpu" else "off"
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    precision, note = cfg.precision, ""
    if precision == "auto":  # bf16 only where it is faster: measured, not assumed (docs/speed.md)
        precision, note = auto_precision(kind)
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    task_threads = _task_threads(cfg.get("task_threads", 1), kind)
    graphs = _switch(cfg.get("cuda_graphs", "off"), "device.cuda_graphs")
    if graphs == "on" and kind != "cuda":
        raise UserError("device.cuda_graphs=on needs a CUDA GPU (this run is on the CPU); "
                        "use device.cuda_graphs=auto or off")
    # auto: off until measured on a GPU (no GPU has been available to this project yet: docs/speed.md)
    cap = cfg.get("memory_cap_mb")
    if cap is not None:
        cap = parse_cap(cap)
    return Runtime(torch.device(kind), torch.bfloat16 if precision == "bf16" else None, channels_last == "on",
                   bool(cfg.compile), task_threads, graphs == "on", cap, note)


def parse_cap(value) -> float:
    """``device.memory_cap_mb`` as a positive, finite number of MiB, or a one-line UserError."""
    try:
        cap = float(value)
    except (TypeError, ValueError):
        cap = float("nan")
    if not (cap > 0 and math.isfinite(cap)):
        raise UserError(f"device.memory_cap_mb={value!r} is not a positive number of MiB; "
                        f"use e.g. device.memory_cap_mb=8000, or null for no cap")
    return cap


# bf16 is chosen where its convolutions beat fp32 by this much: the probe's conv is ~70 % of a
# ProtoNet step, and bf16 adds casts around it, so a smaller edge would not survive the step.
BF16_MIN_SPEEDUP = 1.2


def auto_precision(kind: str) -> tuple[str, str]:
    """``device.precision=auto``: bf16 on a CPU with AMX (measured 1.9x on ProtoNet's step); on one with
    AVX-512-BF16 but no AMX the two measured on opposite sides (an Intel Xeon 0.71x, an AMD EPYC Zen 4
    1.39x), so there a short probe decides; fp32 everywhere else (bf16 is emulated there) and on GPUs
    (unmeasured)."""
    if kind != "cpu":
        return "fp32", ""
    if cpu_has_amx():
        return "bf16", "bf16: the CPU has AMX"
    if not cpu_has_avx512_bf16():
        return "fp32", "fp32: the CPU has no bf16 instructions"
    ratio = bf16_conv_speedup()
    choice = "bf16" if ratio >= BF16_MIN_SPEEDUP else "fp32"
    return choice, f"{choice}: bf16 convolutions measured {ratio:.2f}x fp32 here (bf16 from {BF16_MIN_SPEEDUP}x)"


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has AVX-512-BF16 (bf16 dot products, without AMX's tiles)."""
    return _cpu_feature("_is_avx512_bf16_supported", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def bf16_conv_speedup(reps: int = 7) -> float:
    """fp32 time / bf16-autocast time of a Conv4 layer's forward + backward (64 -> 64 channels, 3x3,
    128 images of 14x14, channels-last), the median of ``reps`` after two warm-ups each; ~0.5 s, once
    per process."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 64, 14, 14, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)

    def timed(dtype: torch.dtype | None) -> float:
        times = []
        for i in range(reps + 2):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
                y = conv(x)
            y.float().sum().backward()
            if i >= 2:
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    return timed(None) / timed(torch.bfloat16)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN's fast bf16 convolutions).  Measured here: with AMX, bf16
    convolutions ran ProtoNet's step 1.9x faster than fp32; on an AVX-512-BF16 Xeon without AMX, 0.71x."""
    return _cpu_feature("_is_amx_tile_supported", "amx_tile")


def _cpu_feature(torch_check: str, flag: str) -> bool:
    """torch's own check ``torch.cpu.<torch_check>()``, else (an older torch) the kernel's CPU flags."""
    try:
        return bool(getattr(torch.cpu, torch_check)())
    except (AttributeError, RuntimeError):
        try:
            with open("/proc/cpuinfo") as f:
                return f" {flag}" in f.read()
        except OSError:
            return False


def _task_threads(value, kind: str) -> int:
    """device.task_threads: auto (CPU: as many as torch's intra-op threads, measured faster on 2
    cores; GPUs: 1) or a count >= 1."""
    v = str(value).strip().lower()
    if v == "auto":
        return torch.get_num_threads() if kind == "cpu" else 1
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"device.task_threads={value!r} is not auto or a whole number >= 1")
    return n


def _switch(value, name: str) -> str:
    """off | on | auto, with booleans (and their spellings) accepted for on / off."""
    v = str(value).strip().lower()
    v = {"true": "on", "false": "off", "1": "on", "0": "off", "yes": "on", "no": "off"}.get(v, v)
    if v not in ("off", "on", "auto"):
        raise UserError(f"{name}={value!r} is not one of off, on, auto (or true / false)")
    return v
