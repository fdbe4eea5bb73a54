"""Bench cases of the metric family (see bench_cases/__init__.py for what each function returns)."""

from __future__ import annotations

WORKLOADS: tuple[str, ...] = ()
CASES: list = []
