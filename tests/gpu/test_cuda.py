"""The CUDA path (run with ``pytest -m gpu`` on a machine with a GPU; deselected elsewhere)."""

from __future__ import annotations

import pytest
import torch

from fewshot_runner.algorithms.maml import MAML
from fewshot_runner.backbones.conv import Conv4
from fewshot_runner.episode import Episode

pytestmark = pytest.mark.gpu


# (without a CUDA GPU these fail with a message: tests/conftest.py, pytest_runtest_setup)


def episodes(device, n_tasks=4, size=28, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(n_tasks, 5, 1, size, size, generator=g, dtype=dtype)
    xq = torch.rand(n_tasks, 15, 1, size, size, generator=g, dtype=dtype)
    ys = torch.arange(5).repeat(n_tasks, 1)
    yq = torch.arange(5).repeat_interleave(3).repeat(n_tasks, 1)
    return Episode(xs, ys, xq, yq, 5).to(device)


def maml(batch_tasks, device, dtype=torch.float64):
    torch.manual_seed(0)
    return MAML(Conv4((1, 28, 28), hidden=16, pool=True, fused_ops="auto"), n_way=5, feature_dim=16,
                inner_lr=0.4, inner_steps=2, batch_tasks=batch_tasks).to(device, dtype)


def test_cuda_vmapped_maml_meta_gradient_matches_the_cpu_loop_in_float64():
    eps_gpu, eps_cpu = episodes("cuda"), episodes("cpu")
    a, b = maml("off", "cpu"), maml("auto", "cuda")
    assert b.task_mode(eps_gpu)
    la, lb = a.meta_loss(eps_cpu)[0], b.meta_loss(eps_gpu)[0]
    ga = torch.autograd.grad(la, list(a.parameters()))
    gb = torch.autograd.grad(lb, list(b.parameters()))
    torch.testing.assert_close(lb.cpu(), la, rtol=1e-9, atol=1e-12)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y.cpu(), x, rtol=1e-7, atol=1e-10)


def test_cuda_smoke_training_through_the_cli(tmp_path):
    from conftest import run_cli

    p = run_cli(["train", "debug=smoke", "device=cuda", "algo=maml", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").exists()


def test_task_chunks_bound_cuda_memory():
    """train.task_chunk: the peak memory of a 32-task meta-batch falls with the chunk size."""
    from fewshot_runner.engine.device import Runtime
    from fewshot_runner.engine.outer_step import gradient_outer_step

    eps = episodes("cuda", n_tasks=32, dtype=torch.float32)
    peaks = []
    for chunk in (32, 4):
        m = maml("on", "cuda", torch.float32)
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gradient_outer_step(m, opt, eps, Runtime(torch.device("cuda"), None, False), chunk, None)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] < 0.5 * peaks[0], peaks


def _train(algo, steps, runtime, graphed=None, planner=None):
    from fewshot_runner.engine.outer_step import gradient_outer_step

    opt = torch.optim.Adam(algo.parameters(), lr=1e-2)
    for i in range(steps):
        eps = episodes("cuda", n_tasks=4) if i % 2 == 0 else episodes("cpu", n_tasks=4).map_tensors(
            lambda t: t.flip(0).to("cuda"))  # new data each step
        gradient_outer_step(algo, opt, eps, runtime, None, None, planner, graphed)
    return [p.detach().cpu() for p in algo.parameters()]


def test_cuda_graph_training_equals_eager_training_in_float64():
    """device.cuda_graphs: the step captured once with torch.cuda.graph and replayed."""
    from fewshot_runner.engine.device import Runtime
    from fewshot_runner.engine.graphs import GraphedStep

    rt = Runtime(torch.device("cuda"), None, False, cuda_graphs=True)
    ref = _train(maml("auto", "cuda"), 4, rt)
    algo = maml("auto", "cuda")
    graphed = GraphedStep(algo, rt)
    got = _train(algo, 4, rt, graphed)
    assert graphed.failed is None, graphed.failed
    assert graphed.backend.graph is not None
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_memory_cap_keeps_a_cuda_step_under_it():
    """device.memory_cap_mb on CUDA: a quarter of the whole batch's peak gives chunks that stay under it."""
    from fewshot_runner.engine.device import Runtime
    from fewshot_runner.engine.memory import MB, ChunkPlanner, measure_peak
    from fewshot_runner.engine.outer_step import gradient_outer_step

    rt = Runtime(torch.device("cuda"), None, False)
    eps = episodes("cuda", n_tasks=32, dtype=torch.float32)
    m = maml("on", "cuda", torch.float32)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    with measure_peak(rt.device) as whole:
        gradient_outer_step(m, opt, eps, rt, None, None)
    cap = whole[0] / MB / 4
    planner = ChunkPlanner(cap)
    m = maml("on", "cuda", torch.float32)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    for _ in range(3):
        metrics = gradient_outer_step(m, opt, eps, rt, None, None, planner)
    assert 1 <= planner.chunk < 32, planner
    assert metrics["peak_mem_mb"] <= cap, (metrics, cap)
