"""device.cuda_graphs: the engine's side of a replayed training step, tested on CPU with
``EagerEmulation`` below (replays write into the tensors of the capture, as a CUDA graph does; the real
capture is in tests/gpu/test_cuda.py).  Training with it equals eager training in float64."""

from __future__ import annotations

import pytest
import torch

from fewshot_runner.algorithms.maml import MAML
from fewshot_runner.backbones.conv import Conv4
from fewshot_runner.engine.device import Runtime
from fewshot_runner.engine.graphs import Body, GraphedStep
from fewshot_runner.engine.memory import ChunkPlanner
from fewshot_runner.engine.outer_step import gradient_outer_step
from fewshot_runner.episode import Episode

CPU = Runtime(torch.device("cpu"), None, False)


class EagerEmulation:
    """A stand-in for :class:`CudaGraphBackend` where there is no GPU (tests): "capture" runs the body
    once and then fills its outputs and gradients with NaN (a real capture computes nothing); "replay"
    runs the body again and copies the results into those same tensors, as a graph replay writes into
    the memory of its capture.  So a caller that reads before replaying, keeps stale inputs or replaces
    the gradient tensors gets wrong numbers here too."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, body: Body, params: list[torch.Tensor]):
        self.captures += 1
        for p in params:
            p.grad = None
        out = body()
        grads = [p.grad for p in params]
        with torch.no_grad():
            for t in [*out.values(), *[g for g in grads if g is not None]]:
                t.fill_(float("nan"))

        def replay() -> None:
            self.replays += 1
            for p in params:
                p.grad = None
            new = body()
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        g.copy_(p.grad if p.grad is not None else torch.zeros_like(g))
                    p.grad = g
                for k, v in out.items():
                    v.copy_(new[k])

        return replay, out


def batch(seed, n_tasks=4, n_way=3, n_query=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(n_tasks, n_way, 1, 16, 16, generator=g, dtype=dtype)
    qx = torch.rand(n_tasks, n_way * n_query, 1, 16, 16, generator=g, dtype=dtype)
    sy = torch.stack([torch.randperm(n_way, generator=g) for _ in range(n_tasks)])
    qy = torch.arange(n_way).repeat_interleave(n_query).repeat(n_tasks, 1)
    return Episode(sx, sy, qx, qy, n_way)


def maml(batch_tasks="off"):
    torch.manual_seed(0)
    net = Conv4((1, 16, 16), hidden=8, pool=True, fused_ops="auto")
    return MAML(net, n_way=3, feature_dim=8, inner_lr=0.3, inner_steps=2, batch_tasks=batch_tasks).double()


def train(algo, steps, graphed=None, task_chunk=None, planner=None, grad_clip=None):
    opt = torch.optim.Adam(algo.parameters(), lr=1e-2)
    losses = []
    for i in range(steps):
        m = gradient_outer_step(algo, opt, batch(i), CPU, task_chunk, grad_clip, planner, graphed)
        losses.append(m["loss"])
    return [p.detach().clone() for p in algo.parameters()], losses


@pytest.mark.parametrize("batch_tasks,task_chunk", [("off", None), ("groups", 3), ("on", 2)])
def test_replayed_training_equals_eager_training_in_float64(batch_tasks, task_chunk):
    ref, ref_losses = train(maml(batch_tasks), 4, task_chunk=task_chunk, grad_clip=0.5)
    algo = maml(batch_tasks)
    backend = EagerEmulation()
    got, losses = train(algo, 4, GraphedStep(algo, CPU, backend), task_chunk=task_chunk, grad_clip=0.5)
    assert backend.captures == 1 and backend.replays == 4  # one capture, a replay per step (new data each)
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_with_a_memory_cap_the_first_step_probes_eagerly_then_the_chunks_are_captured():
    planner = ChunkPlanner(cap_mb=1e6)
    ref, _ = train(maml(), 3, planner=ChunkPlanner(cap_mb=1e6))
    algo = maml()
    backend = EagerEmulation()
    got, _ = train(algo, 3, GraphedStep(algo, CPU, backend), planner=planner)
    assert planner.chunk == 4 and backend.captures == 1 and backend.replays == 2
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_replaced_gradients_or_a_new_shape_capture_again():
    algo = maml()
    backend = EagerEmulation()
    graphed = GraphedStep(algo, CPU, backend)
    opt = torch.optim.Adam(algo.parameters(), lr=1e-2)
    gradient_outer_step(algo, opt, batch(0), CPU, None, None, None, graphed)
    gradient_outer_step(algo, opt, batch(1), CPU, None, None, None, graphed)
    assert backend.captures == 1
    opt.zero_grad(set_to_none=True)  # the captured gradient tensors are gone
    gradient_outer_step(algo, opt, batch(2), CPU, None, None, None, graphed)
    assert backend.captures == 2
    gradient_outer_step(algo, opt, batch(3, n_tasks=2), CPU, None, None, None, graphed)
    assert backend.captures == 3


def test_a_failed_capture_falls_back_to_the_eager_step_with_its_reason():
    class Refuses:
        def capture(self, body, params):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    ref, _ = train(maml(), 2)
    algo = maml()
    graphed = GraphedStep(algo, CPU, Refuses())
    got, _ = train(algo, 2, graphed)
    assert graphed.failed == ("device.cuda_graphs: the capture failed (RuntimeError: operation not permitted "
                              "when stream is capturing)")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_non_finite_replay_skips_the_update():
    algo = maml()
    graphed = GraphedStep(algo, CPU, EagerEmulation())
    opt = torch.optim.Adam(algo.parameters(), lr=1e-2)
    gradient_outer_step(algo, opt, batch(0), CPU, None, None, None, graphed)
    before = [p.detach().clone() for p in algo.parameters()]
    bad = batch(1)
    bad = Episode(bad.support_x * float("nan"), bad.support_y, bad.query_x, bad.query_y, bad.n_way)
    m = gradient_outer_step(algo, opt, bad, CPU, None, None, None, graphed)
    assert not torch.isfinite(torch.tensor(m["loss"]))
    for a, b in zip(algo.parameters(), before):
        assert torch.equal(a.detach(), b)


def test_cuda_graphs_on_without_a_gpu_is_one_clear_line(cli, tmp_path):
    from conftest import one_error_line

    p = cli("train", "debug=smoke", "device.cuda_graphs=on", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(p, "device.cuda_graphs=on needs a CUDA GPU", "device.cuda_graphs=auto or off")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_the_training_loop_with_replayed_steps_ends_where_the_eager_loop_does(compose_cfg, tmp_path, monkeypatch):
    """The engine's loop around the graph (validation between replays, checkpoints, the logged loss):
    ``fewshot train`` with cuda_graphs on, here with the emulation on CPU, writes the eager run's weights."""
    import dataclasses

    import fewshot_runner.engine.build as build_mod
    import fewshot_runner.engine.outer_step as step_mod
    from fewshot_runner.engine.run import train

    overrides = ["debug=smoke", "algo=maml", "train.steps=5", "train.meta_batch_size=3", "train.task_chunk=2"]
    eager = train(compose_cfg(overrides), run_dir=tmp_path / "eager")
    backends = []

    def graphed_step(algo, runtime):
        backends.append(EagerEmulation())
        return GraphedStep(algo, runtime, backends[-1])

    real_resolve = build_mod.resolve_runtime
    monkeypatch.setattr(build_mod, "resolve_runtime", lambda c: dataclasses.replace(real_resolve(c), cuda_graphs=True))
    monkeypatch.setattr(step_mod, "GraphedStep", graphed_step)
    replayed = train(compose_cfg(overrides), run_dir=tmp_path / "graphs")
    assert len(backends) == 1 and backends[0].captures == 1 and backends[0].replays == 5
    a = torch.load(tmp_path / "eager" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "graphs" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert replayed["test/acc"] == eager["test/acc"]
