"""Before Hydra starts: every config of the run (each sweep combination) composed and checked, so a bad
override, shape, checkpoint or folder is one line and no job has started; and after a refused single
run, what it created taken away again (:class:`RunDirGuard`, :func:`remove_refused_run_dir`).

Cheap to import: no torch (it is imported only by the checks that need it, and only where they matter).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fewshot_runner.config import conf_dir
from fewshot_runner.errors import fail

HYDRA_FLAGS_WITHOUT_PREFLIGHT = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--version",
                                 "--shell-completion", "-sc", "--resolve", "-p", "--package"}


# ----------------------------------------------------------------------------- error text
def one_line(text: str) -> str:
    """Hydra/OmegaConf error text -> one line naming the problem (and the fix where known)."""
    m = re.search(r"Could not find '([\w/]+)/(\w+)'.*?Available options in '[\w/]+':\s*(.*?)(?:Config search path|$)",
                  text, re.S)
    if m:
        group, name, opts = m.group(1), m.group(2), m.group(3)
        choices = ", ".join(o.strip() for o in opts.split() if o.strip())
        return f"unknown {group}={name}; choose one of: {choices}"
    m = re.search(r"In '(\w+)/(\w+)': ConfigKeyError.*?Key '[^']+' not in '([^']+)'.*?full_key: ([\w.]+)", text, re.S)
    if m:  # a preset's key that the group chosen beside it lacks (experiment=siamese_omniglot_lake data=synthetic)
        group, name, schema, key = m.groups()
        return (f"{group}={name} sets {key}, which {schema} does not have (another {key.split('.')[0]}= was "
                f"chosen beside it); use {group}={name} with its own {key.split('.')[0]}")
    m = re.search(r"Key '([^']+)' not in '([^']+)'.*?full_key: ([\w.]+)", text, re.S)
    if m:
        return f"unknown config key '{m.group(3)}'; check the spelling (`fewshot train --help` lists every key)"
    m = re.search(r"Value '(.*?)' (?:of type '\w+' )?could not be converted to (\w+).*?full_key: ([\w.]+)", text, re.S)
    if m:
        kind = m.group(2).lower()
        return f"{m.group(3)}={m.group(1)} is not a valid {kind}; give {_a(kind)} {kind} value"
    m = re.search(r"Error merging override ([\w.]+)=(\S*).*?is not a valid (\w+)", text, re.S)
    if m:
        kind = m.group(3).lower()
        return (f"{m.group(1)}={m.group(2)} is not a valid {kind}; give "
                + ("true or false" if kind == "bool" else f"{_a(kind)} {kind} value"))
    m = re.search(r"Error merging override ([\w.]+)=null.*?is not Optional", text, re.S)
    if m:
        return f"{m.group(1)} cannot be null; give it a value"
    m = re.search(r"Error parsing override '([^']*)'", text)
    if m or "override_grammar" in text:
        near = re.search(r"at input '([^']*)'", text)
        what = f"the override '{m.group(1)}'" if m else "the overrides" + (f" near '{near.group(1)}'" if near else "")
        return f"cannot parse {what}; write key=value (https://hydra.cc/docs/advanced/override_grammar/basic/)"
    m = re.search(r"Missing mandatory value: ([\w.]+)", text)
    if m:
        return f"missing value for {m.group(1)}; pass {m.group(1)}=..."
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(
        ("full_key", "object_type", "reference_type", "Set the environment", "Config search path", "provider=",
         "msg:"))]
    return " ".join(lines)[:400] or text.strip()[:400]


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# ----------------------------------------------------------------------------- preflight
def preflight(command: str, args: list[str]) -> None:
    """Compose every config of the run (each sweep combination) before Hydra starts, so a
    bad override is one line and no job has started."""
    if any(a in HYDRA_FLAGS_WITHOUT_PREFLIGHT or a.startswith("--") and a not in ("--multirun",) for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import fewshot_runner.config  # noqa: F401  (registers the schemas)

    overrides = [a for a in args if not a.startswith("-")]
    multirun = "-m" in args or "--multirun" in args
    jobs = []  # (config, its output folder or None)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        if multirun and any(o.is_sweep_override() for o in parsed):
            combos = [c for batch in BasicSweeper.split_arguments(parsed, None) for c in batch]
        else:
            combos = [overrides]
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name=f"fewshot_{command}"):
            for i, combo in enumerate(combos[:64]):
                cfg = compose(config_name=command, overrides=list(combo), return_hydra_config=True)
                from omegaconf import OmegaConf

                default_subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir") \
                    == "${hydra.job.num}"
                OmegaConf.resolve(cfg)  # interpolation errors surface here
                missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
                if missing:
                    fail(f"missing value for {missing[0]}; pass {missing[0]}=..."
                         + (" (the .pt file of a trained run)" if missing[0] == "checkpoint" else ""))
                if i == 0:
                    check_added_keys(command, cfg, parsed)
                check_values(command, cfg)
                if not multirun:
                    jobs.append((cfg, Path(cfg.hydra.run.dir)))
                else:
                    jobs.append((cfg, Path(cfg.hydra.sweep.dir) / str(i) if default_subdir else None))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(one_line(exception_text(e)))
    if jobs:
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        check_writable(Path(jobs[0][0].hydra.sweep.dir if multirun else jobs[0][1]), key)
        check_start(command, jobs)


def check_added_keys(command: str, cfg, parsed) -> None:
    """A key added with ``+``/``++`` must still be one a schema declares: Hydra lets ``+nosuch.key=1``
    through the schemas' struct mode, and the run would silently ignore it.  Keys under a plain dict
    (``fewshot eval``'s ``algo.*``, Hydra's own ``hydra.*``) and config groups (``+experiment=...``) pass."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    groups = {p.name for p in Path(conf_dir()).iterdir() if p.is_dir()}
    for o in parsed:
        if not (o.is_add() or o.is_force_add()) or o.package is not None:
            continue
        key = o.key_or_group
        if key.split(".")[0] == "hydra" or key.split("/")[0] in groups or "/" in key:
            continue
        node = cfg
        for part in key.split("."):
            if not isinstance(node, DictConfig):
                break
            cls = OmegaConf.get_type(node)
            if dataclasses.is_dataclass(cls) and part not in {f.name for f in dataclasses.fields(cls)}:
                fail(f"unknown config key '{key}' (added with {'++' if o.is_force_add() else '+'}): no schema has it, "
                     f"so the run would ignore it; check the spelling (`fewshot {command} --help` lists every key)")
            if part not in node:
                break
            node = node._get_node(part)


def check_checkpoint_file(path: Path, key: str) -> None:
    """Say in the user's words what a file given as a checkpoint is, when it cannot be one: empty, text
    or another kind of file, a torch archive cut short.  Files that look like torch's are left to
    :func:`fewshot_runner.engine.checkpoint.load_checkpoint`, which checks what is inside."""
    import zipfile

    path = path.expanduser()
    if not path.is_file():
        return  # missing, a folder: load_checkpoint says so
    use = "use a .pt file written by `fewshot train` (its run dir's checkpoints/best.pt or last.pt)"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        if not head:
            fail(f"checkpoint {path} is empty (0 bytes): a save that never finished; {use}")
        if head[:4] != b"PK\x03\x04":  # torch.save writes a zip archive (legacy files: a pickle)
            if head[:1] == b"\x80":
                return
            try:
                head.decode("utf-8")
                what = "a text file"
            except UnicodeDecodeError:
                what = "not a torch file"
            fail(f"{key}={path} is not a fewshot checkpoint ({what}); {use}")
        with zipfile.ZipFile(path) as zf:
            if zf.testzip() is not None:
                raise zipfile.BadZipFile
    except (zipfile.BadZipFile, EOFError, ValueError):
        fail(f"checkpoint {path} is corrupt: the torch archive is cut short or damaged (a copy or save that did "
             f"not finish); {use}")
    except OSError as e:
        fail(f"cannot read checkpoint {path} ({e.strerror or e}); check the file's permissions")


def check_writable(folder: Path, key: str) -> None:
    """The output folder can be created and written to, before Hydra tries (it would print
    a traceback).  Folders made for the test are removed again."""
    p, missing = folder.absolute(), []
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        fail(f"cannot create {key}={folder}: {p} is a file, not a folder; choose another {key}=...")
    created = []
    try:
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fewshot_write_test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        fail(f"cannot write to {key}={folder} ({e.strerror or e}); choose a writable folder with {key}=...")
    finally:
        for m in reversed(created):
            try:
                m.rmdir()
            except OSError:
                pass


def check_start(command: str, jobs: list) -> None:
    """Checks that need torch, run only where they matter (a CUDA device, device.compile, a checkpoint
    to read, an output folder that exists): before Hydra starts, so a refused run changes no file."""
    todo = [(cfg, d) for cfg, d in jobs
            if cfg.device.type == "cuda" or cfg.device.get("compile") or command in ("eval", "predict")
            or cfg.get("resume")
            or (d is not None and d.exists())]
    if not todo:
        return
    from fewshot_runner.errors import UserError

    try:
        from fewshot_runner.engine.checkpoint import check_targets, load_checkpoint
        from fewshot_runner.engine.device import resolve_runtime
        from fewshot_runner.engine.eval_checkpoint import check_eval_run_dir
        from fewshot_runner.engine.rundir import check_start as check_train_start

        for cfg, run_dir in todo:
            if command in ("eval", "predict"):
                check_checkpoint_file(Path(str(cfg.checkpoint)), "checkpoint")
            elif cfg.get("resume"):
                resume = Path(str(cfg.resume)) if cfg.resume != "auto" else \
                    run_dir / "checkpoints" / "last.pt" if run_dir is not None else None
                if resume is not None:
                    check_checkpoint_file(resume, "resume")
            if command == "train" and run_dir is not None:
                check_train_start(cfg, run_dir)  # device, run dir, checkpoint to resume from
            else:
                resolve_runtime(cfg.device)
                if command == "eval" and run_dir is not None:  # before Hydra writes its .hydra/ and cli.log there
                    check_eval_run_dir(run_dir)
                if command in ("eval", "predict"):
                    check_targets(load_checkpoint(cfg.checkpoint), cfg.checkpoint)
    except UserError as e:
        fail(str(e), getattr(e, "exit_code", 2))


def exception_text(e: BaseException) -> str:
    """The messages of an exception and of its causes, outermost first."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def check_values(command: str, cfg) -> None:
    """Cheap checks of values a schema cannot express."""
    choices = {"device.type": ("auto", "cpu", "cuda"), "device.precision": ("fp32", "bf16", "auto"),
               "device.fused_ops": ("auto", "on", "off"), "device.batch_tasks": ("auto", "on", "groups", "off"),
               "eval.split": ("train", "val", "test")}
    if command == "train":
        choices["train.on_nan"] = ("stop", "skip")
        choices["train.lr_schedule"] = ("step", "cosine")
        choices["train.split"] = ("train", "trainval")
    from omegaconf import OmegaConf

    for key, allowed in choices.items():
        v = OmegaConf.select(cfg, key)
        if v is not None and v not in allowed:
            fail(f"{key}={v} is not one of: {', '.join(allowed)}")
    from fewshot_runner.loggers import check_kind  # (cheap: no comet_ml import)

    msg = check_kind(OmegaConf.select(cfg, "logger.kind")) if "logger" in cfg else None  # (predict: no logger)
    if msg:
        fail(msg)
    positive = ["eval.n_episodes", "eval.chunk"]
    if command == "train":
        positive += ["train.steps", "train.meta_batch_size", "train.val_every", "train.val_episodes",
                     "train.ckpt_every", "train.log_every", "data.n_way", "data.n_shot", "data.n_query"]
    for key in positive:
        v = OmegaConf.select(cfg, key)
        if v is not None and v < 1:
            fail(f"{key}={v} must be a positive integer")
    # a regression data set's schema says task_kind = "regression" (schemas/sinusoid.py): one output, n_way 1
    classification = getattr(OmegaConf.get_type(cfg, "data") if "data" in cfg else None, "task_kind",
                             "classification") == "classification"
    for key in ("data.n_way", "data.train_n_way"):
        v = OmegaConf.select(cfg, key)
        if v == 1 and classification:
            fail(f"{key}=1: a 1-way episode has a single class, so every answer is right and the accuracy means "
                 f"nothing; use {key}=2 or more (5 and 20 are the usual)")
    if command == "train":
        v = OmegaConf.select(cfg, "train.lr_min")
        if v is not None and not 0 <= v <= 1:
            fail(f"train.lr_min={v} must be between 0 and 1 (a fraction of train.outer_lr)")
        v = OmegaConf.select(cfg, "train.ema_decay")
        if v is not None and not 0 <= v < 1:
            fail(f"train.ema_decay={v} must be 0 (off) or a decay in (0, 1), e.g. 0.99")


# ----------------------------------------------------------------------------- refused runs
class RunDirGuard:
    """A Hydra callback (``hydra.callbacks`` in train.yaml / eval.yaml): before a single run, notes what
    its run dir held, so that a run refused after Hydra made the folder (the data set is too small for
    the episode shape, the checkpoint cannot be evaluated that way, ...) can take away what it created:
    :func:`remove_refused_run_dir`.  Only Hydra's record (``.hydra/``), ``*.log`` files and empty files
    or folders are ever removed; a folder that existed before the run is kept, and so is anything the
    run wrote (a checkpoint, metrics)."""

    state: tuple[Path, Path | None, set[str]] | None = None  # run dir, highest folder created, names held before

    def on_run_start(self, config, **kwargs) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        top, p = None, run_dir
        while not p.exists() and p != p.parent:
            top, p = p, p.parent
        held = set(os.listdir(run_dir)) if run_dir.is_dir() else set()
        RunDirGuard.state = (run_dir, top, held)

    def _ignore(self, *args, **kwargs) -> None:
        return None

    on_run_end = on_multirun_start = on_multirun_end = on_job_start = on_job_end = on_compose_config = _ignore


def _disposable(path: Path, top_level: bool = True) -> bool:
    """Nothing of value: Hydra's record, log files, empty files and folders."""
    if path.is_symlink() or path.is_file():
        return path.is_file() and not path.is_symlink() and (
            path.stat().st_size == 0 or (top_level and path.suffix == ".log"))
    if path.is_dir():
        if top_level and path.name == ".hydra":
            return all(p.is_file() and p.suffix == ".yaml" for p in path.iterdir())
        return all(_disposable(p, top_level=False) for p in path.iterdir())
    return False


def remove_refused_run_dir() -> None:
    """After a refused single run: remove what it created in (and above) its run dir, if nothing of value."""
    import shutil

    if RunDirGuard.state is None:
        return
    run_dir, top, held = RunDirGuard.state
    RunDirGuard.state = None
    try:
        if not run_dir.is_dir():
            return
        new = [p for p in run_dir.iterdir() if p.name not in held]
        if not all(_disposable(p) for p in new):
            return
        if top is None:  # the folder was there before: take away only what this run added
            for p in new:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            return
        shutil.rmtree(run_dir)
        p = run_dir.parent
        while top != run_dir and p != p.parent and (p == top or top in p.parents):
            p.rmdir()  # only while empty: a folder another run put something in stays
            if p == top:
                break
            p = p.parent
    except OSError:
        pass
