"""``train(cfg)``: a plain function that returns its metrics, read as a recipe: set up, loop, finish.

The Hydra entry points in :mod:`fewshot_runner.cli` only wrap it, so tests call it with a config
from ``compose(...)``.  Where each concern lives:

* building the parts from the config: :mod:`~fewshot_runner.engine.build`;
* the loop (batches, the outer update, logging, validation, checkpoints): :mod:`~fewshot_runner.engine.loop`;
* the gradient outer step, chunks and task threads: :mod:`~fewshot_runner.engine.outer_step`,
  :mod:`~fewshot_runner.engine.task_threads`;
* the run dir and resume: :mod:`~fewshot_runner.engine.rundir`; SIGINT/SIGTERM:
  :mod:`~fewshot_runner.engine.signals`; the ``$FEWSHOT_FAULT`` test hook: :mod:`~fewshot_runner.engine.faults`;
* ``fewshot eval``: :mod:`~fewshot_runner.engine.eval_checkpoint`.

Runs survive faults: a killed run resumed with ``resume=auto`` ends bitwise equal to an unbroken one;
a signal stops after the current step with a checkpoint (exit 130/143); a non-finite loss stops the run
(``train.on_nan=stop``) or skips that update (``skip``); checkpoints and results are written atomically.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fewshot_runner import __version__
from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.engine.build import (build_dataset, build_learner, build_transforms, close_logger, episode_shapes,
                                         make_optimizer, make_run_logger, make_scheduler, prefetched, run_runtime,
                                         seed_everything)
from fewshot_runner.engine.console import console, results_table
from fewshot_runner.engine.ema import WeightAverage, eval_weights
from fewshot_runner.engine.evaluate import (evaluate, learner_measures, measure_rows, nonfinite_note, nonfinite_results,
                                            task_metric)
from fewshot_runner.engine.faults import FaultPlan
from fewshot_runner.engine.loop import TrainingRun
from fewshot_runner.engine.messages import say, write_json
from fewshot_runner.engine.outer_step import step_helpers
from fewshot_runner.engine.rundir import (adopt_run_files, check_start, drop_final_records, finished_run, make_run_dir,
                                          restore_rng, restore_training_state, resume_hint)
from fewshot_runner.engine.signals import Interrupted, StopFlag


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train, keep the best model on validation episodes, test it; return the results dict.

    SIGINT/SIGTERM are caught for the whole run: training stops after the current step with a
    checkpoint (exit code 130/143 through ``SystemExit``).
    """
    if cfg.get("print_config"):
        from fewshot_runner.engine.banner import print_config_tree

        print_config_tree(cfg)
    stop = StopFlag()
    with stop.installed():
        return _train(cfg, run_dir, stop)


def _train(cfg: DictConfig, run_dir: str | Path | None, stop: StopFlag) -> dict[str, Any]:
    t_start = time.time()
    run_dir = make_run_dir(run_dir)
    results_path = finished_run(cfg, run_dir)
    if results_path is not None:
        say(f"done already: {results_path} exists (resume=auto; a larger train.steps trains on); skipping")
        return json.loads(results_path.read_text())

    faults = FaultPlan.from_env()  # (a malformed $FEWSHOT_FAULT is refused before anything is built)
    run, test_split = setup(cfg, run_dir, stop, t_start, faults)
    try:
        start(run)
        run.loop()
        results = finish(run, test_split)
    except Interrupted as e:
        for m in close_logger(run.logger):
            say(m)
        say(f"{e}; {resume_hint(run_dir)}", err=True)
        raise SystemExit(130 if stop.signum == signal.SIGINT else 143) from None
    except BaseException:
        for m in close_logger(run.logger):
            say(m)
        raise
    finally:
        close = getattr(run.source, "close", None)  # (a prefetching loader's workers)
        if close is not None:
            close()
    report(run, results)
    return results


def setup(cfg: DictConfig, run_dir: Path, stop: StopFlag, t_start: float, faults: FaultPlan):
    """Every part of the run, built from the config (and a checkpoint when resuming); the run dir gets
    its config.yaml and loggers.  Returns the :class:`TrainingRun` and the test split."""
    state, resume_path = check_start(cfg, run_dir)
    runtime = run_runtime(cfg.device)

    dataset = build_dataset(cfg.data)
    tr, ev = episode_shapes(cfg.data)
    train_split, test_split = dataset.split(cfg.train.split), dataset.split(cfg.eval.split)
    validate = cfg.train.split != "trainval"  # trainval holds the validation classes: keep the last model
    val_split = dataset.split("val") if validate else None
    train_split.check_episode_shape(tr.n_way, tr.n_shot, tr.n_query)  # (any split: data/base.py, data/sinusoid.py)
    for split in (val_split or dataset.split("val"), test_split):
        split.check_episode_shape(ev.n_way, ev.n_shot, ev.n_query)
    train_tf, eval_tf = build_transforms(cfg.data, channels=dataset.x_shape[0])

    seed_everything(cfg.seed)
    algo = build_learner(cfg, dataset.x_shape, tr.n_way, runtime, train_split.task_kind)
    algo.check_n_way(ev.n_way)
    optimizer = make_optimizer(cfg, algo)
    scheduler = make_scheduler(optimizer, cfg.train)
    source = prefetched(algo.batch_source(train_split, tr.n_way, tr.n_shot, tr.n_query, seed=cfg.seed + 1),
                        cfg.data, runtime)
    # after batch_source: a learner may size its weights there (Baseline's head over the training classes)
    average = WeightAverage(algo, cfg.train.ema_decay) if cfg.train.ema_decay else None
    planner, graphed = step_helpers(algo, runtime, cfg.train)
    _banner(cfg, run_dir, runtime, algo)

    run = TrainingRun(cfg=cfg, run_dir=run_dir, runtime=runtime, algo=algo, optimizer=optimizer, scheduler=scheduler,
                      average=average, source=source, val_split=val_split, eval_shape=ev, train_transform=train_tf,
                      eval_transform=eval_tf, planner=planner, graphed=graphed, logger=None,
                      faults=faults, stop=stop, config_plain=OmegaConf.to_container(cfg, resolve=True),
                      t_start=t_start, metric=task_metric(test_split.task_kind))
    run.best_acc = run.metric.worst  # (accuracy: -1; a regression's MSE: inf)
    run.resume_state, run.resume_path = state, resume_path
    if state is not None:
        restore_training_state(state, resume_path, cfg, algo, optimizer, scheduler, source, average)
        run.step = int(state["step"])
        run.best_acc, run.best_step = float(state["best_val_acc"]), int(state["best_step"])
        run.window = {k: [float(x) for x in v] for k, v in (state.get("log_window") or {}).items()}
        run.wall_before = float(state.get("wall_time", 0.0))
        if planner is not None and (state.get("chunk_plan") or {}).get("cap_mb") == planner.cap_mb:
            planner.chunk = int(state["chunk_plan"]["chunk"])  # the same chunks as before the stop: same bits
        adopt_run_files(resume_path, run_dir)
        say(f"resuming from {resume_path} at step {run.step}")
    if cfg.resume:
        ckpt.remove_stale_temp_files(run.ckpt_dir)  # torn saves of a killed run
        drop_final_records(run_dir / "metrics.jsonl")

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True).encode()
    ckpt.atomic_write(run_dir / "config.yaml", lambda f: f.write(config_yaml))
    # a fresh run cuts metrics.jsonl to nothing, a resumed one back to its checkpoint's step
    run.logger = make_run_logger(cfg, run_dir, truncate_after_step=run.step)
    return run, test_split


def _banner(cfg: DictConfig, run_dir: Path, runtime, algo) -> None:
    """The start-of-run banner: what runs, where, and what the ``auto`` settings chose."""
    from fewshot_runner.engine.banner import print_banner
    from fewshot_runner.loggers import describe_kind

    auto = dict(algo.execution_notes(runtime.task_threads))
    fused = cfg.backbone.get("fused_ops")
    if fused is not None:
        auto["fused ops"] = (f"{fused}: C++ BN+ReLU+max-pool kernels where a compiler builds them (CPU, fp32/64)"
                             if fused != "off" and runtime.device.type == "cpu" else f"{fused}: off")
    print_banner(OmegaConf.to_container(cfg, resolve=True), run_dir, runtime,
                 n_params=sum(p.numel() for p in algo.parameters()),
                 logger_where=describe_kind(cfg.logger.kind, run_dir), auto=auto)


def start(run: TrainingRun) -> None:
    """What comes between building and the first step: parameters to the loggers, then the RNGs of a
    resumed run (last: anything drawing from them before, importing comet_ml included, would shift them)."""
    run.logger.log_params(run.config_plain)
    run.logger.log_asset(run.run_dir / "config.yaml")
    if run.stop:
        raise Interrupted(f"stopped by {run.stop.name} before step {run.step + 1}; nothing new to save")
    if run.resume_state is not None:
        restore_rng(run.resume_state["rng"], run.resume_path)
        run.resume_state = None  # (the weights are in the learner now; do not hold a second copy)


def finish(run: TrainingRun, test_split) -> dict[str, Any]:
    """Test the best model (the last one when there was no validation) and write results.json."""
    from fewshot_runner.engine.pictures import save_pictures
    from fewshot_runner.plots import save_curves

    cfg, algo, ev, m = run.cfg, run.algo, run.eval_shape, run.metric
    best_path = run.ckpt_dir / "best.pt"
    if best_path.exists():
        algo.load_state_dict(eval_weights(ckpt.load_checkpoint(best_path)))
    elif run.average is not None:
        algo.load_state_dict(run.average.weights)
    test = evaluate(algo, test_split, ev.n_way, ev.n_shot, ev.n_query, cfg.eval.n_episodes, cfg.eval.seed + 1,
                    cfg.eval.chunk, run.runtime, transform=run.eval_transform)
    tr, _ = episode_shapes(cfg.data)
    measures = learner_measures(algo, test_split, tr.n_way, tr.n_shot + tr.n_query, cfg.eval.n_episodes,
                                cfg.eval.seed + 1, run.runtime, transform=run.eval_transform)
    results = {
        f"test/{m.name}": test[m.name], "test/ci95": test["ci95"], "test/n_episodes": test["n_episodes"], **measures,
        "test/split": cfg.eval.split, f"val/best_{m.name}": run.best_acc if run.validate else None,
        "train/split": cfg.train.split, "best_step": run.best_step, "steps": run.step,
        "n_way": ev.n_way, "n_shot": ev.n_shot, "n_query": ev.n_query, "wall_time_s": run.wall_time(),
        "checkpoint": str(best_path if best_path.exists() else run.ckpt_dir / "last.pt"),
        "precision": run.runtime.precision, "package_version": __version__,
        "data/split_checksum": getattr(test_split, "split_checksum", None),
        **nonfinite_results(test, m.name),
    }
    run.logger.log_metrics({f"test/{m.name}": test[m.name], "test/ci95": test["ci95"], **measures}, run.step)
    if cfg.eval.pictures:
        curves = save_curves(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
        if curves:
            run.logger.log_image(curves, "curves")
        save_pictures(algo, test_split, ev, run.runtime, run.eval_transform, run.run_dir, cfg.eval.seed + 1,
                      run.logger)
    write_json(run.run_dir / "results.json", results)
    run.logger.log_asset(run.run_dir / "results.json")
    run.logger.log_model("best", best_path)  # (uploaded only with logger.log_model=true)
    return results


def report(run: TrainingRun, results: dict[str, Any]) -> None:
    """Close the loggers and print the results table."""
    cfg, ev, m = run.cfg, run.eval_shape, run.metric
    messages = close_logger(run.logger)
    console.print(results_table(
        f"{cfg.data._target_.rsplit('.', 1)[-1]} {m.shape_text(ev.n_way, ev.n_shot)}: "
        f"{cfg.algo._target_.rsplit('.', 1)[-1]}",
        [(f"test {m.name}", m.text(results[f"test/{m.name}"], results["test/ci95"])),
         ("test episodes", str(results["test/n_episodes"])),
         (f"best val {m.name}", f"{m.value_text(run.best_acc)} (step {run.best_step})" if run.validate
          else f"none: trained on {cfg.train.split}, the last model (step {run.best_step}) kept"),
         *measure_rows(results),
         ("steps", str(run.step)), ("wall time", f"{results['wall_time_s']:.0f} s"), ("run dir", str(run.run_dir))]))
    note = nonfinite_note(results, m.name)
    for line in ([note] if note else []) + messages:
        say(line)
    if run.stop:
        say(f"{run.stop.name} arrived during the final test; the run completed anyway")
