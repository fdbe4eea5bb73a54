"""``device.cuda_graphs``: a training step's forward and backward as one replayed CUDA graph.

Every training batch has the same shape, so the whole meta-gradient (every chunk's forward, the
inner loop, its backward and the outer backward) can be captured once and replayed: one launch
instead of thousands of small kernels, which is where a GPU spends a MAML step of small Omniglot
tasks.  The recipe is PyTorch's whole-network capture
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs):

* the batch is copied into static input tensors; the graph reads only those;
* warm-up iterations run on a side stream first (lazy initialisation, cuBLAS workspaces);
* ``.grad`` is None at capture, so the capture allocates the gradients in the graph's memory
  pool, and every replay writes (not adds) the new gradient into those same tensors: the engine
  must not replace them (no ``zero_grad(set_to_none=True)`` while the graph lives); it checks that
  they are the captured tensors before each replay and captures again if not;
* the loss and metrics are static outputs, read after the replay; a non-finite loss skips the
  optimizer step, which runs eagerly outside the graph (with gradient clipping);
* autocast runs with its weight cache off, as the PyTorch notes require inside a capture.

A capture that fails (an op that synchronises with the host, say) prints one line and the run goes
on without graphs.  The backend is a parameter so that the plumbing is tested on CPU with
an emulation (tests/test_cuda_graphs.py); the CUDA backend itself needs a GPU (``gpu``-marked tests).
"""

from __future__ import annotations

from typing import Callable

import torch

from fewshot_runner.episode import Episode

Body = Callable[[], dict[str, torch.Tensor]]


class CudaGraphBackend:
    """Capture with ``torch.cuda.graph`` after ``warmup`` side-stream iterations."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.graph = None

    def capture(self, body: Body, params: list[torch.Tensor]):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                for p in params:
                    p.grad = None
                body()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = body()
        return self.graph.replay, out


class GraphedStep:
    """The meta-gradient of a batch of one fixed shape, captured once and replayed.

    ``run(episodes, bounds)`` leaves the meta-gradient in ``.grad`` and returns the metrics (0-dim
    tensors, averaged over tasks, as ``outer_step.gradient_outer_step`` computes them).  ``bounds``: the task
    chunks, ``[(start, stop), ...]``.  A new shape, new chunks, or gradients replaced since the capture
    make it capture again.
    """

    def __init__(self, algo, runtime, backend=None) -> None:
        self.algo = algo
        self.runtime = runtime
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.params = [p for p in algo.parameters() if p.requires_grad]
        self.static: Episode | None = None
        self.key = None
        self.replay = None
        self.out: dict[str, torch.Tensor] = {}
        self.grads: list[torch.Tensor | None] = []
        self.failed: str | None = None  # why the capture failed (the engine then goes on without graphs)

    def _body(self, bounds: list[tuple[int, int]]) -> Body:
        static, algo, runtime = self.static, self.algo, self.runtime
        n = static.n_tasks

        def body() -> dict[str, torch.Tensor]:
            sums: dict[str, torch.Tensor] = {}
            for s, e in bounds:
                w = (e - s) / n
                with runtime.autocast(cache_enabled=False):
                    loss, metrics = algo.meta_loss(static.tasks(s, e))
                (loss * w).backward()
                for k, v in metrics.items():
                    v = v.detach() * w
                    sums[k] = sums[k] + v if k in sums else v
            return sums

        return body

    def _key(self, episodes: Episode, bounds) -> tuple:
        shapes = tuple((t.shape, t.dtype, t.device) for t in
                       (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y))
        return shapes, episodes.n_way, tuple(bounds)

    def _copy_in(self, episodes: Episode) -> None:
        st = self.static
        for dst, src in ((st.support_x, episodes.support_x), (st.support_y, episodes.support_y),
                         (st.query_x, episodes.query_x), (st.query_y, episodes.query_y)):
            dst.copy_(src, non_blocking=True)

    def run(self, episodes: Episode, bounds: list[tuple[int, int]]) -> dict[str, torch.Tensor] | None:
        """The metrics; None when the capture failed (``failed`` says why; ``.grad`` is then None)."""
        if self.failed:
            return None
        key = self._key(episodes, bounds)
        stale = self.replay is None or key != self.key or \
            any(p.grad is not g for p, g in zip(self.params, self.grads))
        if stale:
            self.static = episodes.map_tensors(lambda t: t.clone())
            try:
                self.replay, self.out = self.backend.capture(self._body(bounds), self.params)
            except RuntimeError as e:
                first = (str(e).strip().splitlines() or [""])[0][:200]
                self.failed = f"device.cuda_graphs: the capture failed ({type(e).__name__}: {first})"
                self.replay, self.out, self.static = None, {}, None
                for p in self.params:
                    p.grad = None
                return None
            self.grads = [p.grad for p in self.params]
            self.key = key
        else:
            self._copy_in(episodes)
        self.replay()
        return dict(self.out)
