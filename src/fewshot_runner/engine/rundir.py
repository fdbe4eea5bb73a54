"""The run directory and resuming a run.

Resume: ``resume=auto`` (``<run dir>/checkpoints/last.pt``) or ``resume=PATH`` restores the model,
optimizer, LR scheduler, batch source, the Python/NumPy/torch RNGs, the best validation score, the
logging window and the step, and cuts ``metrics.jsonl`` back to that step, so a killed run, resumed,
ends bitwise equal to an uninterrupted one (on the same device).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.engine.build import check_compile, learner_class
from fewshot_runner.engine.device import resolve_runtime
from fewshot_runner.engine.ema import WeightAverage
from fewshot_runner.errors import CheckpointError, UserError


def make_run_dir(run_dir: str | Path | None) -> Path:
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    p = Path(run_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.exists() else None
    return Path(resume).expanduser()


def finished_run(cfg: DictConfig, run_dir: str | Path) -> Path | None:
    """``resume=auto`` on a run that has trained its ``train.steps`` (its results.json says how many):
    that results.json, which the run is skipped for.  None when there is no finished run, or when
    ``train.steps`` asks for more than it trained: then the run goes on from its ``last.pt`` (and its
    results.json is replaced at the new end, not before)."""
    path = Path(run_dir) / "results.json"
    if cfg.resume != "auto" or not path.exists():
        return None
    try:
        trained = json.loads(path.read_text()).get("steps")
    except ValueError:
        trained = None
    if isinstance(trained, int) and int(cfg.train.steps) > trained and (path.parent / "checkpoints" / "last.pt").exists():
        return None
    return path


def check_start(cfg: DictConfig, run_dir: str | Path) -> tuple[dict | None, Path | None]:
    """What can be checked before a run writes anything: the device (and device.compile against the
    learner), that the run dir holds no other run (unless resuming), and the checkpoint to resume from.

    Returns ``(state, path)`` of the checkpoint to resume from, or ``(None, None)``.  Raises a
    one-line UserError.  The CLI calls this before Hydra starts; :func:`train` calls it too.
    """
    run_dir = Path(run_dir)
    if resolve_runtime(cfg.device).compile:  # before the data is read: refused in seconds, not minutes
        check_compile(learner_class(cfg.algo))
    if cfg.device.get("memory_cap_mb") is not None and cfg.train.get("task_chunk"):
        raise UserError(f"train.task_chunk={cfg.train.task_chunk} and device.memory_cap_mb="
                        f"{cfg.device.memory_cap_mb} both set the chunks of a batch; keep one (the other null)")
    if finished_run(cfg, run_dir):
        return None, None  # done already: train() skips it
    if not cfg.resume:
        held = [f for f in ("results.json", "checkpoints/last.pt") if (run_dir / f).exists()]
        if held:
            raise UserError(f"{run_dir} already holds a run ({held[0]}); resume it with resume=auto, "
                            f"or choose a new hydra.run.dir (or hydra.sweep.dir)")
    path = _resolve_resume(cfg.resume, run_dir)
    if path is None:
        return None, None
    state = ckpt.load_checkpoint(path)
    check_same_run(state["config"], cfg, path)
    steps_then = (state["config"].get("train") or {}).get("steps")
    learner = learner_class(cfg.algo)
    if steps_then is not None and steps_then != cfg.train.steps and learner.anneals_over_steps:
        raise CheckpointError(f"checkpoint {path} was trained with train.steps={steps_then}, over which "
                              f"{learner.__name__} anneals its schedules; resume with train.steps={steps_then} "
                              f"(to train longer, start a new run)")
    return state, path



def check_same_run(saved: dict, cfg: DictConfig, path: Path) -> None:
    """A resumed run must be the same model and algorithm."""
    now = OmegaConf.to_container(cfg, resolve=True)
    for key in ("algo", "backbone"):
        if saved.get(key, {}).get("_target_") != now[key].get("_target_"):
            raise CheckpointError(f"checkpoint {path} was trained with {key} {saved.get(key, {}).get('_target_')}, "
                                  f"not {now[key].get('_target_')}; resume with the same {key}= as the original run")
    # the optimizer's and scheduler's states come back from the checkpoint, so a changed learning rate or
    # schedule would be ignored without a word (and a cosine schedule is fixed to its train.steps)
    was, cur = saved.get("train") or {}, now.get("train") or {}
    keys = ["lr_schedule", "outer_lr", "lr_decay_every", "lr_decay", "lr_min"]
    if was.get("lr_schedule", "step") == "cosine":
        keys.append("steps")
    changed = [k for k in keys if k in was and was.get(k) != cur.get(k)]
    if changed:
        then = " ".join(f"train.{k}={was[k]}" for k in changed)
        raise CheckpointError(f"checkpoint {path} was trained with {then}, which its optimizer and learning-rate "
                              f"schedule carry on; resume with {then}"
                              + (" (a cosine schedule is fixed to its steps; to train longer, start a new run "
                                 "from scratch, or use train.lr_schedule=step)" if "steps" in changed else ""))
    ema_then = float(was.get("ema_decay") or 0.0)  # checkpoints from before the key: no average
    if ema_then != float(cur.get("ema_decay") or 0.0):
        raise CheckpointError(f"checkpoint {path} was trained with train.ema_decay={ema_then}, which its weight "
                              f"average carries on; resume with train.ema_decay={ema_then}")


def adopt_run_files(resume_path: Path, run_dir: Path) -> None:
    """``resume=PATH`` of another run dir: bring its metrics.jsonl and best.pt along (if this
    dir has none), so the resumed run's history and final test are those of one run."""
    src = resume_path.parent.parent
    if resume_path.parent.name != "checkpoints" or not src.is_dir():
        return
    try:
        if src.resolve() == run_dir.resolve():
            return
    except OSError:
        return
    for rel in ("metrics.jsonl", "checkpoints/best.pt"):
        if (src / rel).is_file() and not (run_dir / rel).exists():
            data = (src / rel).read_bytes()
            ckpt.atomic_write(run_dir / rel, lambda f, data=data: f.write(data))


def _is_final_record(line: str) -> bool:
    try:
        rec = json.loads(line)
    except ValueError:
        return False
    return isinstance(rec, dict) and any(str(k).startswith("test/") for k in rec)


def drop_final_records(path: Path) -> None:
    """Remove the test metrics of an interrupted final phase: a resumed run logs them again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [ln for ln in lines if not _is_final_record(ln)]
    if len(kept) != len(lines):
        text = "".join(ln + "\n" for ln in kept).encode()
        ckpt.atomic_write(path, lambda f: f.write(text))


def restore_training_state(state: dict, path: Path, cfg: DictConfig, algo, optimizer, scheduler, sampler,
                           average: WeightAverage | None) -> None:
    """Load a checkpoint's model, optimizer, schedule, batch source and weight average into this run's;
    every failure is one CheckpointError line (a model that does not fit names the settings that differ)."""
    try:
        algo.load_state_dict(state["model"])
    except RuntimeError as e:
        why = str(e).splitlines()[-1].strip()[:160]
        diff = changed_settings(state["config"], OmegaConf.to_container(cfg, resolve=True))
        then = f"; it was trained with {diff}" if diff else ""
        raise CheckpointError(f"checkpoint {path} does not fit this model ({why}){then}; resume with the backbone, "
                              f"algo and data settings of the original run (its config.yaml)") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if average is not None:
            average.load_state_dict(state["ema"])
        float(state["best_val_acc"]), int(state["best_step"])
        if not isinstance(state["rng"], dict):
            raise TypeError("rng is not a dict")
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} lacks the training state to resume from (no {e.args[0]!r}: "
                              f"a model-only file?); resume from a last.pt written by `fewshot train`, or start "
                              f"afresh without resume=") from None
    except (ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        why = str(e).splitlines()[0][:120] if str(e) else "it does not fit this run"
        raise CheckpointError(f"checkpoint {path} has a broken training state ({why}); resume from a last.pt "
                              f"written by `fewshot train`, or start afresh without resume=") from None


def restore_rng(rng: dict, path: Path) -> None:
    try:
        ckpt.set_rng_state(rng)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError):
        raise CheckpointError(f"checkpoint {path} has a broken random-generator state; resume from a "
                              f"last.pt written by `fewshot train`, or start afresh without resume=") from None


def resume_hint(run_dir: Path) -> str:
    """The command that resumes this run (the same command line plus resume=auto)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get() if HydraConfig.initialized() else None
    except ImportError:  # pragma: no cover
        hc = None
    if hc is None or not sys.argv or not sys.argv[0].startswith("fewshot "):
        return f"resume with resume=auto and the same run dir ({run_dir})"
    args = [a for a in sys.argv[1:] if not a.startswith("resume=")]
    if hc.mode == RunMode.MULTIRUN:
        if not any(a.startswith("hydra.sweep.dir=") for a in args):
            args.append(f"hydra.sweep.dir={hc.sweep.dir}")
    elif not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    return "resume with: " + " ".join(shlex.quote(a) for a in [*sys.argv[0].split(), *args, "resume=auto"])


def changed_settings(saved: dict, now: dict, groups=("data", "backbone", "algo")) -> str:
    """``data.n_way=5 (now 20) ...``: the settings of ``groups`` that differ between two plain configs."""
    out = []
    for g in groups:
        was, cur = saved.get(g) or {}, now.get(g) or {}
        for k in sorted(set(was) | set(cur)):
            if was.get(k) != cur.get(k) and not isinstance(was.get(k), dict):
                out.append(f"{g}.{k}={was.get(k)} (now {cur.get(k)})")
    return " ".join(out[:6])

