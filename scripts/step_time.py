"""Time one outer step of ``fewshot train`` under several settings, side by side.

    python scripts/step_time.py --backbone conv4_strided --n-query 1 device.batch_tasks=off device.batch_tasks=on
    python scripts/step_time.py --n-query 15 device.channels_last=off device.channels_last=on
    python scripts/step_time.py --profile 15 ""      # the default fast path, profiled

Each positional argument is one setting: a space-separated list of Hydra overrides applied on top
of ``algo=<--algo> backbone=<--backbone> data=synthetic device=cpu``. Every setting runs in its own
process (the allocator tuned as the ``fewshot`` launcher tunes it), times ``--iters`` outer steps
after ``--warmup`` (the same seeded tasks, ``gradient_outer_step`` as in training), and the table
gives the median ms per step and the ratio to the FIRST setting (> 1: faster than it). This is how
docs/speed.md measured ``device.batch_tasks`` and ``device.channels_last`` on CPU; ``scripts/bench.py``
is the benchmark against the plain reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fewshot_runner.cli import ALLOCATOR_ENV  # what the fewshot launcher sets for itself (imports no torch)

PREFIX = "STEP_TIME "


def child(args) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    import fewshot_runner.config  # noqa: F401  (registers the schemas)
    from fewshot_runner.cli import conf_dir
    from fewshot_runner.data.sampler import EpisodeSampler
    from fewshot_runner.data.synthetic import Synthetic
    from fewshot_runner.engine.device import resolve_runtime
    from fewshot_runner.engine.build import build_learner
    from fewshot_runner.engine.outer_step import gradient_outer_step

    overrides = [f"algo={args.algo}", f"backbone={args.backbone}", "data=synthetic", "device=cpu", "logger=none",
                 f"device.threads={args.threads}", f"data.n_way={args.n_way}", f"data.n_shot={args.n_shot}",
                 f"data.n_query={args.n_query}", *args.setting.split()]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    runtime = resolve_runtime(cfg.device)
    size = 28
    algo = build_learner(cfg, (1, size, size), args.n_way, runtime)
    algo.train()
    split = Synthetic(n_classes_train=max(64, args.n_way), per_class=20, image_size=size, channels=1,
                      seed=0).split("train")
    episodes = EpisodeSampler(split, args.n_way, args.n_shot, args.n_query, seed=1).sample(args.tasks).to("cpu")
    opt = torch.optim.Adam(algo.parameters(), lr=1e-3)
    times = []
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        gradient_outer_step(algo, opt, episodes, runtime, None, None)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    print(PREFIX + json.dumps({"setting": args.setting, "ms": [t * 1e3 for t in times]}), flush=True)
    if args.profile:  # one more step under torch.profiler: where the time goes, by op and by shape
        from torch.profiler import profile

        with profile(record_shapes=True) as prof:
            gradient_outer_step(algo, opt, episodes, runtime, None, None)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
        by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        print("largest (op, input shapes):")
        for e in by_shape[:args.profile]:
            print(f"  {e.self_cpu_time_total / 1e3:9.1f} ms  n={e.count:<5d} {e.key}  {str(e.input_shapes)[:100]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="*", help="space-separated override lists, one per setting (first: the baseline)")
    p.add_argument("--algo", default="maml")
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--n-shot", type=int, default=1)
    p.add_argument("--n-query", type=int, default=15)
    p.add_argument("--tasks", type=int, default=32, help="tasks per outer step")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one step per setting and print its top N ops (by self time and by shape)")
    p.add_argument("--setting", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.setting is not None:
        child(args)
        return 0
    settings = args.settings or [""]
    rows = []
    for setting in settings:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--setting", setting]
        for k in ("algo", "backbone", "n_way", "n_shot", "n_query", "tasks", "threads", "warmup", "iters", "profile"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        env = {**os.environ, **ALLOCATOR_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith(PREFIX)]
        if out.returncode != 0 or not lines:
            tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"error: setting {setting!r} failed: {tail}", file=sys.stderr)
            return 1
        ms = json.loads(lines[-1][len(PREFIX):])["ms"]
        if args.profile:
            print(f"--- profile of {setting or '(defaults)'}")
            print("\n".join(ln for ln in out.stdout.splitlines() if not ln.startswith(PREFIX)
                            and not ln.startswith(("USDT:", "ERROR:"))))
        rows.append((setting or "(defaults)", statistics.median(ms), min(ms), max(ms)))
    from rich.console import Console
    from rich.table import Table

    title = (f"{args.algo}, {args.backbone}, {args.n_way}-way {args.n_shot}-shot {args.n_query} queries, "
             f"{args.tasks} tasks per step, {args.threads} threads (median of {args.iters})")
    table = Table(title=title)
    for col in ("setting", "ms/step", "min-max", "vs first"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    base = rows[0][1]
    for name, med, lo, hi in rows:
        table.add_row(name, f"{med:,.0f}", f"{lo:,.0f}-{hi:,.0f}", f"{base / med:.2f}x")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
