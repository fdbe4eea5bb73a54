"""``fewshot eval``: re-test a saved model on fixed episodes, with the device settings given to it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fewshot_runner import __version__
from fewshot_runner.algorithms.base import MetaLearner
from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.engine.build import (build_dataset, build_learner, build_transforms, close_logger, episode_shapes,
                                         learner_class, make_run_logger, run_runtime)
from fewshot_runner.engine.console import console, results_table
from fewshot_runner.engine.ema import eval_weights
from fewshot_runner.engine.evaluate import (evaluate, learner_measures, measure_rows, nonfinite_note, nonfinite_results,
                                            task_metric)
from fewshot_runner.engine.pictures import save_pictures
from fewshot_runner.engine.messages import say, write_json
from fewshot_runner.engine.rundir import make_run_dir
from fewshot_runner.errors import CheckpointError, UserError


def with_device(saved: DictConfig, device: DictConfig) -> DictConfig:
    """A saved (resolved) run config set to run on ``device``: its ``device`` node is replaced, and so is
    every backbone/algo key that was an interpolation of a device key (``backbone.fused_ops``,
    ``algo.batch_tasks``: same name), so ``fewshot eval ... device.fused_ops=off`` takes effect."""
    saved = saved.copy()
    saved.device = OmegaConf.create(OmegaConf.to_container(device, resolve=True))
    for group in ("backbone", "algo"):
        node = saved.get(group)
        for key in list(node.keys()) if node is not None else []:
            if key in saved.device and key != "_target_":
                node[key] = saved.device[key]
    return saved


def check_eval_run_dir(run_dir: Path) -> None:
    """`fewshot eval` writes results.json and a fresh metrics.jsonl: refuse a folder holding a run's."""
    held = [f for f in ("results.json", "metrics.jsonl", "checkpoints/last.pt") if (Path(run_dir) / f).exists()]
    if held:
        raise UserError(f"{run_dir} already holds a run ({held[0]}); give `fewshot eval` a new hydra.run.dir "
                        f"(its default is a fresh outputs/eval/<date>/<time>)")


@contextmanager
def _built_from(path: str | Path, state: dict):
    """Building a checkpoint's saved config: a setting this version's classes do not take (a checkpoint
    of another fewshot version, or of a build with an option since removed) is one CheckpointError."""
    from hydra.errors import InstantiationException

    try:
        yield
    except InstantiationException as e:  # Hydra's wrapper of the target's own error
        if not isinstance(e.__cause__, TypeError):  # not a signature mismatch: not this error
            raise
        why = str(e.__cause__).splitlines()[0][:160] if str(e.__cause__) else "TypeError"
        raise CheckpointError(f"checkpoint {path} holds settings this fewshot ({__version__}) cannot build "
                              f"({why}); it was written by fewshot {state.get('package_version', '?')} "
                              f"with other options: evaluate it with the version (commit) that wrote it") from None


def evaluate_checkpoint(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Re-test a saved model on ``cfg.eval.n_episodes`` episodes of ``cfg.eval.split``."""
    state = ckpt.load_checkpoint(cfg.checkpoint)
    ckpt.check_targets(state, cfg.checkpoint)  # its config is instantiated below
    run_dir = make_run_dir(run_dir)
    check_eval_run_dir(run_dir)
    saved = with_device(OmegaConf.create(state["config"]), cfg.device)
    trained_on = saved.data._target_
    if cfg.data.get("name"):
        saved.data = other_data(cfg.data.name, saved.data)
    for k in ("n_way", "n_shot", "n_query", "root", "split_scheme", "within_alphabet"):
        v = cfg.data.get(k)
        if v is None:
            continue
        if k not in ("n_way", "n_shot", "n_query", "root") and k not in saved.data:
            raise UserError(f"data.{k} is not a key of this data set ({saved.data._target_.rsplit('.', 1)[-1]}); "
                            f"leave it out")
        OmegaConf.update(saved, f"data.{k}", v, force_add=True)
    apply_eval_settings(saved, cfg.get("algo") or {})
    runtime = run_runtime(cfg.device)
    with _built_from(cfg.checkpoint, state):
        dataset = build_dataset(saved.data)
    tr, ev = episode_shapes(saved.data)
    split = dataset.split(cfg.eval.split)
    split.check_episode_shape(ev.n_way, ev.n_shot, ev.n_query)  # (any split: data/base.py, data/sinusoid.py)
    m = task_metric(split.task_kind)  # accuracy, or a regression's MSE
    train_n_way = state["config"]["data"].get("train_n_way") or state["config"]["data"]["n_way"]
    with _built_from(cfg.checkpoint, state):
        algo = build_learner(saved, dataset.x_shape, train_n_way, runtime, split.task_kind)
    try:
        algo.load_state_dict(eval_weights(state))
    except RuntimeError as e:
        if saved.data._target_ != trained_on:
            raise UserError(f"the checkpoint's model does not take data={cfg.data.name}'s images "
                            f"({'x'.join(map(str, dataset.x_shape))}: {str(e).splitlines()[0][:120]}); set "
                            f"data.image_size (and channels) of that data set to the training data's") from None
        raise CheckpointError(f"checkpoint {cfg.checkpoint} does not match its own config's model "
                              f"({str(e).splitlines()[0]}); it may come from another version of fewshot") from None
    algo.check_n_way(ev.n_way)
    _, eval_tf = build_transforms(saved.data, channels=dataset.x_shape[0])
    test = evaluate(algo, split, ev.n_way, ev.n_shot, ev.n_query, cfg.eval.n_episodes, cfg.eval.seed + 1,
                    cfg.eval.chunk, runtime, transform=eval_tf)
    measures = learner_measures(algo, split, tr.n_way, tr.n_shot + tr.n_query, cfg.eval.n_episodes,
                                cfg.eval.seed + 1, runtime, transform=eval_tf)
    results = {f"test/{m.name}": test[m.name], "test/ci95": test["ci95"], "test/n_episodes": test["n_episodes"],
               **measures,
               "test/split": cfg.eval.split, "test/data": saved.data._target_.rsplit(".", 1)[-1], "n_way": ev.n_way, "n_shot": ev.n_shot, "n_query": ev.n_query,
               **{f"algo/{k}": saved.algo[k] for k in learner_class(saved.algo).eval_settings if k in saved.algo},
               "checkpoint": str(cfg.checkpoint), "step": int(state["step"]), "precision": runtime.precision,
               "data/split_checksum": getattr(split, "split_checksum", None), **nonfinite_results(test, m.name)}
    write_json(run_dir / "results.json", results)
    pictures = save_pictures(algo, split, ev, runtime, eval_tf, run_dir, cfg.eval.seed + 1) if cfg.eval.pictures else []
    messages = _log_eval(cfg, run_dir, saved, results, pictures)
    console.print(results_table(
        f"eval {Path(cfg.checkpoint).name}: {m.shape_text(ev.n_way, ev.n_shot)}, {cfg.eval.split}",
        [(m.name, m.text(test[m.name], test["ci95"])), ("episodes", str(test["n_episodes"])), *measure_rows(results),
         ("run dir", str(run_dir))]))
    note = nonfinite_note(results, m.name)
    for line in ([note] if note else []) + messages:
        say(line)
    return results


def other_data(name: str, saved_data: DictConfig) -> DictConfig:
    """``fewshot eval data=NAME``: the data config ``conf/data/NAME.yaml`` (its schema's defaults), with the
    checkpoint's episode shape (``n_way``, ``n_shot``, ``n_query``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from fewshot_runner.config import conf_dir

    def composed() -> DictConfig:
        return compose("train", overrides=[f"data={name}"]).data

    try:
        if GlobalHydra.instance().is_initialized():  # inside `fewshot eval` (a Hydra app on the same conf/)
            data = composed()
        else:
            with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
                data = composed()
    except MissingConfigException:
        names = sorted(p.stem for p in (Path(conf_dir()) / "data").glob("*.yaml"))
        raise UserError(f"data={name} is not a data set; use one of {', '.join(names)}") from None
    for k in ("n_way", "n_shot", "n_query"):
        data[k] = saved_data[k]
    return data


def _log_eval(cfg: DictConfig, run_dir: Path, saved: DictConfig, results: dict[str, Any],
              pictures: list[tuple[Path, str]]) -> list[str]:
    """``logger=`` for ``fewshot eval`` (default none: metrics.jsonl only): the eval settings and the
    checkpoint's training config as parameters, the results as metrics at the checkpoint's step, the
    pictures (engine/pictures.py) as images."""
    logger = make_run_logger(cfg, run_dir, truncate_after_step=0, job="eval", described=saved)  # a fresh run dir (evaluate_checkpoint)
    try:
        logger.log_params({"eval": OmegaConf.to_container(cfg, resolve=True),
                           "trained": OmegaConf.to_container(saved, resolve=True)})
        logger.log_metrics({k: v for k, v in results.items() if k.startswith("test/") and isinstance(v, (int, float))},
                           results["step"])  # (test/split and test/data are text, not metrics)
        logger.log_other("checkpoint", results["checkpoint"])
        for path, name in pictures:
            logger.log_image(path, name)
    finally:
        messages = close_logger(logger)
    return messages

def apply_eval_settings(saved: DictConfig, overrides) -> None:
    """``fewshot eval algo.KEY=VALUE``: only the keys the learner declares in ``eval_settings`` (its
    test-time adaptation) may change; the value takes the type of the saved one."""
    given = {k: v for k, v in dict(overrides).items() if v is not None}
    if not given:
        return
    cls = learner_class(saved.algo)
    allowed = cls.eval_settings if isinstance(cls, type) and issubclass(cls, MetaLearner) else ()
    for k, v in given.items():
        if k not in allowed or k not in saved.algo:
            can = f"only {', '.join('algo.' + a for a in allowed)}" if allowed else "none of its settings"
            raise UserError(f"algo.{k}={v}: `fewshot eval` may change {can} of the checkpoint's learner "
                            f"({cls.__name__}); leave algo.{k} out")
        was = saved.algo[k]
        try:
            value = type(was)(v) if isinstance(was, (int, float)) and not isinstance(was, bool) else v
        except (TypeError, ValueError):
            raise UserError(f"algo.{k}={v!r} is not a valid {type(was).__name__}") from None
        OmegaConf.update(saved, f"algo.{k}", value)
