"""device.task_threads: a MAML meta-batch split over worker threads gives the one-thread step's
meta-gradient (float64) and the same bits on every run (fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_episodes

from fewshot_runner.algorithms.maml import MAML
from fewshot_runner.backbones.conv import Conv4
from fewshot_runner.engine.device import Runtime, resolve_runtime
from fewshot_runner.engine.outer_step import gradient_outer_step
from fewshot_runner.engine.task_threads import task_threads_for
from fewshot_runner.errors import UserError


def episodes(n_tasks=5, dtype=torch.float64):
    return toy_episodes(n_tasks, dtype=dtype)


def maml(dtype=torch.float64, pool=True):
    torch.manual_seed(0)
    net = Conv4((1, 16, 16), hidden=4, pool=pool, fused_ops="auto")
    return MAML(net, n_way=3, feature_dim=4, inner_lr=0.3, inner_steps=1, batch_tasks="off").to(dtype)


def step_grads(algo, eps, threads):
    rt = Runtime(torch.device("cpu"), None, False, task_threads=threads)
    opt = torch.optim.SGD(algo.parameters(), lr=0.0)  # lr 0: the step leaves the weights as they are
    metrics = gradient_outer_step(algo, opt, eps, rt, None, None)
    return [p.grad.clone() for p in algo.parameters()], metrics


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_meta_gradient_equals_one_thread_in_float64(threads):
    eps = episodes(n_tasks=5)  # 5 tasks over 2 or 3 threads: unequal groups
    algo = maml()
    ref, ref_m = step_grads(algo, eps, 1)
    assert task_threads_for(algo, eps, Runtime(torch.device("cpu"), None, False, task_threads=threads)) == threads
    got, got_m = step_grads(algo, eps, threads)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert got_m["loss"] == pytest.approx(ref_m["loss"], rel=1e-12)
    assert got_m["acc"] == pytest.approx(ref_m["acc"], rel=1e-6)  # (accuracy is averaged in float32)


def test_threaded_step_is_bitwise_repeatable_in_fp32_and_trains_the_real_weights():
    eps = episodes(n_tasks=6, dtype=torch.float32)
    runs = []
    for _ in range(2):
        algo = maml(torch.float32)
        before = [p.detach().clone() for p in algo.parameters()]
        rt = Runtime(torch.device("cpu"), None, False, task_threads=2)
        opt = torch.optim.Adam(algo.parameters(), lr=1e-2)
        for _ in range(2):
            gradient_outer_step(algo, opt, eps, rt, None, None)
        after = [p.detach().clone() for p in algo.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the step moved the weights
        runs.append(after)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_task_threads_stand_aside_for_vmap_cuda_and_batch_wide_learners():
    eps = episodes(n_tasks=4)
    rt = Runtime(torch.device("cpu"), None, False, task_threads=2)
    algo = maml()
    assert task_threads_for(algo, eps, rt) == 2
    algo.batch_tasks = "on"  # vmapped tasks: one call for the batch
    assert task_threads_for(algo, eps, rt) == 1

    from fewshot_runner.algorithms.base import MetaLearner

    class BatchWide(MetaLearner):  # e.g. ProtoNet: batch norm over the whole batch (the default)
        pass

    assert task_threads_for(BatchWide(), eps, rt) == 1
    assert task_threads_for(maml(), eps.tasks(0, 1), rt) == 1  # one task


def test_task_threads_setting(compose_cfg):
    cfg = compose_cfg(["data=synthetic", "device=cpu"])
    assert resolve_runtime(cfg.device).task_threads == torch.get_num_threads()  # auto on CPU
    cfg = compose_cfg(["data=synthetic", "device=cpu", "device.task_threads=3"])
    assert resolve_runtime(cfg.device).task_threads == 3
    cfg = compose_cfg(["data=synthetic", "device=cpu", "device.task_threads=0"])
    with pytest.raises(UserError, match="device.task_threads='0' is not auto or a whole number >= 1"):
        resolve_runtime(cfg.device)


def test_replicas_follow_settings_changed_on_the_learner():
    """A setting changed after the first threaded step (here inner_lr) reaches the workers' replicas."""
    eps = episodes(n_tasks=4)
    algo = maml()
    step_grads(algo, eps, 2)  # builds the replicas
    algo.inner_lr = 0.05
    got, _ = step_grads(algo, eps, 2)
    ref, _ = step_grads(algo, eps, 1)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class ReverseCompletionPool:
    """The task pool, except that group i may finish only once group i+1 has: the groups complete in
    the reverse of their order on every run, so a sum taken in completion order differs from the one in
    group order every time, not only when the scheduler happens to reorder them."""

    def __init__(self, k: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.k = k
        self.inner = ThreadPoolExecutor(max_workers=k, initializer=torch.set_num_threads, initargs=(1,))
        self.finished: list = []
        self.submitted = 0

    def submit(self, fn, *args):
        import threading

        i = self.submitted % self.k  # (every group of a step is submitted: n_tasks >= k here)
        self.submitted += 1
        if i == 0:
            self.finished = [threading.Event() for _ in range(self.k)]
        later = self.finished[i + 1] if i + 1 < self.k else None

        def gated():
            if later is not None:
                assert later.wait(timeout=120), "the later group never finished"
            return fn(*args)

        fut = self.inner.submit(gated)
        fut.add_done_callback(lambda _f, e=self.finished[i]: e.set())  # after the future is marked done
        return fut


def group_gradients(algo, eps, k):
    """Each contiguous group's gradient (the task-thread split of n tasks into k), computed alone on
    this thread with one intra-op thread, as a worker computes it."""
    params = [p for p in algo.parameters() if p.requires_grad]
    n = eps.n_tasks
    bounds = [round(i * n / k) for i in range(k + 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for i in range(k):
            group = eps.tasks(bounds[i], bounds[i + 1])
            loss, _ = algo.meta_loss(group)
            out.append(torch.autograd.grad(loss * (1.0 * (group.n_tasks / n)), params))
    finally:
        torch.set_num_threads(threads)
    return out


def summed(grads_per_group):
    total = list(grads_per_group[0])
    for grads in grads_per_group[1:]:
        total = [t + g for t, g in zip(total, grads)]
    return total


@pytest.mark.parametrize("threads,pool", [(3, "threads"), (4, "threads"), (4, "reverse completion")])
def test_task_thread_gradients_are_summed_in_group_order_bitwise(threads, pool, monkeypatch):
    """fp32, 8 tasks over 3-4 threads: the meta-gradient is, bit for bit, the groups' gradients added
    in group order (with 2 groups any order gives the same bits; from 3 on the order shows).  The
    reverse-completion pool makes the groups finish last-first on every run."""
    from fewshot_runner.engine import task_threads

    eps = episodes(n_tasks=8, dtype=torch.float32)
    algo = maml(torch.float32)
    in_order = summed(group_gradients(algo, eps, threads))
    reversed_order = summed(group_gradients(algo, eps, threads)[::-1])
    assert any(not torch.equal(a, b) for a, b in zip(in_order, reversed_order)), \
        "these tasks do not tell the summation orders apart; the test would prove nothing"
    if pool == "reverse completion":
        gated = ReverseCompletionPool(threads)
        monkeypatch.setitem(task_threads._task_pool, threads, gated)
    try:
        rt = Runtime(torch.device("cpu"), None, False, task_threads=threads)
        assert task_threads_for(algo, eps, rt) == threads
        got, _ = step_grads(algo, eps, threads)
    finally:
        if pool == "reverse completion":
            gated.inner.shutdown(wait=True)
    for i, (a, b) in enumerate(zip(got, in_order)):
        same = torch.equal(a, b)
        assert same, (f"parameter {i}: the threaded meta-gradient is not the group-order sum "
                                   f"(max diff {float((a - b).abs().max()):.3g})")
