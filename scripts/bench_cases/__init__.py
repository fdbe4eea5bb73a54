"""Bench cases of the learners beyond MAML and ProtoNet, one module per family.

``scripts/bench.py`` imports every module named in ``FAMILIES``; each defines

``CASES``
    ``bench.Case`` objects whose ``workload`` is a key of the module's ``WORKLOADS`` (the learner:
    ``reptile``, ``matchingnet``, ...); ``Case.algo`` is the ``algo=`` config and
    ``Case.overrides`` any extra ``fewshot train`` overrides.
``reference_step(case, device, tiny) -> step``
    the plain reference, written the usual way (a per-task loop, ``autograd.grad``, the paper's or
    easyfsl's structure), independent of the package's algorithms; ``step()`` runs one training
    step in fp32 and returns its loss.
``fast_step(case, device_type, threads, fused, precision, tiny) -> (step, info)``
    the package's step, built the way ``fewshot train`` builds it (``bench.compose_learner``; the
    learner's own ``outer_step`` or ``engine.outer_step.gradient_outer_step``), on the same tasks and
    initial weights as the reference; ``info``: extra fields for the result row.
``check(case, tiny) -> dict``
    the package against the reference on the same weights and tasks: ``grad_rel_err`` (fast fp32 vs
    reference fp64; see bench.py), ``ref_grad_rel_err`` (the reference's own fp32 error),
    ``grad_rel_err_fp64`` (fast fp64 vs reference fp64), ``grad_check`` (which net), and/or
    ``loss_rel_err`` / ``loss_rel_err_fp64`` (|loss_fast - loss_ref| / |loss_ref| in fp32 / fp64),
    ``check_note``.
``describe(case) -> (fast_path, reference)``
    one line each for the result row.
"""

from __future__ import annotations

import importlib

FAMILIES: tuple[str, ...] = ("gradient", "metric", "memory")


def load() -> dict:
    """{workload: module} over the family modules."""
    found: dict = {}
    for family in FAMILIES:
        module = importlib.import_module(f"bench_cases.{family}")
        for workload in module.WORKLOADS:
            found[workload] = module
    return found
