"""``device.memory_cap_mb``: chunk a meta-batch so one forward/backward stays under a memory cap.

The tasks of a meta-batch are independent, so the meta-gradient is the weighted sum of the
gradients of any split of them into chunks (``outer_step.gradient_outer_step``); a chunk's peak memory
grows linearly with its tasks.  :class:`ChunkPlanner` measures it on the first outer step, no
extra work: the first chunk is one task, the second two, and the rest of the batch runs in the
largest chunk the line ``fixed + per_task * k`` fits under the cap; those chunks are measured too
(on CPU that first step runs in one thread), and the largest chunk's peak is logged as
``train/peak_mem_mb``.  On CUDA every later step is measured as well (``torch.cuda.max_memory_allocated``,
no synchronisation) and the chunk shrinks if one went over the cap.

What is measured:

* CUDA: the peak of ``torch.cuda.max_memory_allocated`` during the chunk, above what was
  allocated when it began (the model, the optimizer state and the batch itself are not counted).
* CPU: the bytes the chunk's autograd graph saves for its backward (``saved_tensors_hooks``;
  each distinct tensor once, a view by the bytes it spans; a saved tensor freed early, as the inner
  graphs of first-order MAML are, whose memory a later one reuses, counts once: an estimate of the
  peak, not a sum).  That is the part of a step's memory that grows with the tasks; the
  allocator's own caching and short-lived temporaries are not in it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from fewshot_runner.engine.device import parse_cap
from fewshot_runner.errors import UserError

MB = 2**20


def chunk_bounds(start: int, n: int, chunk: int) -> list[tuple[int, int]]:
    """Tasks start..n-1 in chunks of ``chunk``: [(start, start + chunk), ..., (.., n)]."""
    return [(s, min(s + chunk, n)) for s in range(start, n, chunk)]


class SavedTensorBytes:
    """Bytes of the distinct tensors autograd saves for backward inside the ``with`` block (this thread)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()

    def _pack(self, t: torch.Tensor):
        try:
            # a view counts what it spans (a slice of the batch: its part; an expand: its storage), once
            size = min(t.untyped_storage().nbytes(), t.numel() * t.element_size())
            key = (t.data_ptr(), size)
            if t.data_ptr() and key not in self._seen:
                self._seen.add(key)
                self.bytes += size
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrappers)
            pass
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @contextlib.contextmanager
    def measure(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


@contextlib.contextmanager
def measure_peak(device: torch.device):
    """Yields a one-element list that holds, after the block, its peak memory in bytes (see the module doc)."""
    out = [0]
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)  # (the allocator's own counts: no synchronisation needed)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out[0] = max(0, torch.cuda.max_memory_allocated(device) - base)
    else:
        probe = SavedTensorBytes()
        with probe.measure():
            yield out
        out[0] = probe.bytes


@dataclass
class ChunkPlanner:
    """Chooses the tasks per chunk under ``cap_mb`` (see the module doc)."""

    cap_mb: float
    chunk: int | None = None  # decided on the first step
    fixed_mb: float = 0.0
    per_task_mb: float = 0.0
    last_peak_mb: float = 0.0  # the largest chunk peak of the last step
    messages: list[str] = field(default_factory=list)  # one line when the chunk is chosen or changed

    def __post_init__(self) -> None:
        self.cap_mb = parse_cap(self.cap_mb)

    def bounds(self, n: int) -> list[tuple[int, int]] | None:
        """The chunks of an n-task batch once the chunk is known, else None (the first step probes)."""
        return None if self.chunk is None else chunk_bounds(0, n, self.chunk)

    def probe_bounds(self, n: int) -> list[tuple[int, int]]:
        """The first step's first chunks: 1 task, then 2 (fewer if the batch is smaller)."""
        out = [(0, 1)]
        if n > 1:
            out.append((1, min(3, n)))
        return out

    def fit(self, n: int, peaks: list[tuple[int, int]]) -> int:
        """From (tasks, peak bytes) of the probe chunks, choose and remember the chunk for n-task batches."""
        (k1, m1) = peaks[0]
        if len(peaks) > 1 and peaks[1][0] > k1:
            k2, m2 = peaks[1]
            per_task = max((m2 - m1) / (k2 - k1), m2 / (2 * k2))  # (noise can make the difference tiny)
        else:
            per_task = m1 / k1
        fixed = max(0.0, m1 - per_task * k1)
        self.per_task_mb, self.fixed_mb = per_task / MB, fixed / MB
        if m1 / MB > self.cap_mb:
            raise UserError(f"one task needs {m1 / MB:.0f} MiB, over device.memory_cap_mb={self.cap_mb:g}; raise the "
                            f"cap, or make the tasks smaller (data.train_n_query, data.train_n_way)")
        k = int((self.cap_mb - self.fixed_mb) // max(self.per_task_mb, 1e-9))
        self.chunk = max(1, min(n, k))
        self.messages.append(f"device.memory_cap_mb={self.cap_mb:g}: {self.chunk} of {n} tasks per chunk "
                             f"(measured {self.per_task_mb:.1f} MiB per task + {self.fixed_mb:.1f} MiB)")
        return self.chunk

    def observe(self, peaks_mb: list[float]) -> None:
        """After a step: remember its peak; on a chunk over the cap, shrink the chunk for the next steps."""
        self.last_peak_mb = max(peaks_mb) if peaks_mb else 0.0
        if self.chunk is None or self.last_peak_mb <= self.cap_mb or self.chunk == 1:
            return
        new = max(1, int(self.chunk * self.cap_mb / self.last_peak_mb))
        if new < self.chunk:
            self.messages.append(f"device.memory_cap_mb={self.cap_mb:g}: a chunk of {self.chunk} tasks peaked at "
                                 f"{self.last_peak_mb:.0f} MiB; {new} tasks per chunk from now on")
            self.chunk = new
