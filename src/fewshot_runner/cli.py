"""The ``fewshot`` command: ``fewshot train|eval [hydra overrides]``.

Kept thin and cheap to import: torch is imported only once a run really starts, so
``--help`` and config errors answer in about a second.  Every user error ends as one line
on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import sys

from fewshot_runner.config import conf_dir  # noqa: F401  (re-exported: tests and scripts import it from here)
from fewshot_runner.errors import fail
from fewshot_runner.preflight import (HYDRA_FLAGS_WITHOUT_PREFLIGHT, exception_text, one_line, preflight,
                                      remove_refused_run_dir)

USAGE = """usage: fewshot COMMAND [OVERRIDES...] [-m] [--help]

commands:
  train       train a meta-learner, keep the best model on validation classes, test it
              e.g. fewshot train algo=maml data=omniglot        (the MAML paper's Omniglot setup)
                   fewshot train -m algo=maml,protonet data.n_shot=1,5     (a sweep)
                   fewshot train debug=smoke                               (a CPU smoke run, seconds)
  eval        re-test a saved run: fewshot eval checkpoint=PATH [data.n_way=20] [eval.n_episodes=600]
  predict     classify your own images: fewshot predict checkpoint=PATH support=DIR query=DIR [out=FILE.csv]
              (support/<class_name>/* the labelled examples, query/* the images to classify)
  list        the algorithms, data sets, backbones, optimizers, devices, loggers and presets, a line each
  data        fewshot data check data=NAME: what is under the data set's root, what is missing, where to get it;
              fewshot data prepare data=NAME: build its cache with a progress bar (both before any training)
  completion  the shell completion script: eval "$(fewshot completion bash)"   (or zsh)

`fewshot train --help` lists the config groups and every key with its description.
Overrides are Hydra's: key=value, group=option.
"""

COMMANDS = ("train", "eval", "predict", "list", "completion", "data")
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


# ----------------------------------------------------------------------------- allocator
def _maybe_reexec_with_allocator(args: list[str]) -> None:
    """Re-exec once with glibc malloc thresholds raised (FIELD_NOTES: 1.33x on these CPUs).

    Skipped when already set, when the user turned it off (device.tune_allocator=false),
    or for help/config-only invocations.
    """
    if all(os.environ.get(k) for k in ALLOCATOR_ENV) or os.environ.get("FEWSHOT_NO_REEXEC"):
        return
    if any(a.startswith("device.tune_allocator=") and a.split("=", 1)[1].lower() in ("false", "0", "no")
           for a in args):
        return
    if any(a in HYDRA_FLAGS_WITHOUT_PREFLIGHT for a in args):
        return
    env = dict(os.environ)
    for k, v in ALLOCATOR_ENV.items():
        env.setdefault(k, v)
    env["FEWSHOT_NO_REEXEC"] = "1"
    try:
        os.execve(sys.executable, [sys.executable, "-m", "fewshot_runner.cli", *sys.argv[1:]], env)
    except OSError:
        return  # run as we are


# ----------------------------------------------------------------------------- hydra entry
def _task(command: str):
    def task(cfg) -> None:
        from fewshot_runner.engine.sweep import job_failed, sweep_job_dir
        from fewshot_runner.errors import UserError

        # in a multirun, a job's failure is recorded in its folder and the sweep goes on; the summary at
        # the end lists it and the sweep exits non-zero (engine/sweep.py)
        job_dir = sweep_job_dir()
        try:
            if command == "train":
                from fewshot_runner.engine.run import train

                train(cfg)
            elif command == "predict":
                from fewshot_runner.predict import predict

                predict(cfg)
            else:
                from fewshot_runner.engine.eval_checkpoint import evaluate_checkpoint

                evaluate_checkpoint(cfg)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as e:  # noqa: BLE001
            message, code = None, 1
            if isinstance(e, UserError):
                message, code = str(e), getattr(e, "exit_code", 2)
            elif isinstance(e, OSError):  # the disk or the file system, not the input: still one line
                import errno

                where = f" ({e.filename})" if e.filename else ""
                code = 2
                message = (f"no space left on the device{where}; free some disk space and resume with resume=auto"
                           if e.errno in (errno.ENOSPC, errno.EDQUOT) else
                           f"{e.strerror or e}{where}; check the disk and the folder's permissions, then resume "
                           f"with resume=auto")
            if job_dir is not None:
                job_failed(job_dir, e, message, code)
                return
            if message is None:
                raise
            fail(message, code)

    return task


def _discovery(command: str, args: list[str]) -> None:
    from fewshot_runner import discovery

    if command == "list":
        if args:
            fail(f"fewshot list takes no arguments (got {' '.join(args)})")
        _print(discovery.list_text())
        return
    shell = args[0] if args else "bash"
    if shell not in ("bash", "zsh") or len(args) > 1:
        fail(f"fewshot completion {' '.join(args)}: use fewshot completion bash (or zsh)")
    print(discovery.completion_script(shell))


def with_eval_settings(command: str, args: list[str]) -> list[str]:
    """``fewshot eval algo.KEY=V``: the checkpoint's learner says which keys it takes (its eval_settings); the
    schema cannot know them, so they are added (``++``) and checked once the checkpoint is read.
    ``fewshot eval data=NAME`` (cross-domain) becomes ``data.name=NAME``."""
    out = ["++" + a if command in ("eval", "predict") and a.startswith("algo.") else a for a in args]
    # `fewshot eval data=cub`: the data set to test on (eval has no data group: its data node holds overrides)
    return [f"data.name={a[5:]}" if command == "eval" and a.startswith("data=") else a for a in out]


def _help(command: str, overrides: list[str]) -> None:
    """``fewshot train|eval --help [overrides]``: the groups and every key with its description."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fewshot_runner.discovery import help_text

    try:
        text = help_text(command, with_eval_settings(command, overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(one_line(exception_text(e)))
    _print(text)


def _print(text: str) -> None:
    """Print, quietly stopping where a pager or `| head` stopped reading."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] in ("-V", "--version"):
        from fewshot_runner import __version__

        print(f"fewshot_runner {__version__}")
        return
    command, args = argv[0], argv[1:]
    if command in ("-sc", "--shell-completion"):  # what the completion function calls: fewshot -sc query=bash
        from fewshot_runner.discovery import shell_completion

        return shell_completion(args[0] if args else None)
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; use one of: {', '.join(COMMANDS)} (see `fewshot --help`)")
    if command in ("list", "completion"):
        return _discovery(command, args)
    if command == "data":  # fewshot data check|prepare (data_commands.py)
        from fewshot_runner.data_commands import main as data_main

        return data_main(args)
    flags = [a for a in args if a.startswith("-")]
    if "-sc" in flags or "--shell-completion" in flags:  # Hydra's flag on a command: our script, for all commands
        from fewshot_runner.discovery import shell_completion

        i = max(args.index(f) for f in ("-sc", "--shell-completion") if f in args)
        return shell_completion(args[i + 1] if i + 1 < len(args) else None)
    if "--help" in flags or "-h" in flags:
        return _help(command, [a for a in args if not a.startswith("-")])
    _maybe_reexec_with_allocator(args)
    if not sys.stdout.isatty():  # a pipe or a batch job's log: each line as it is printed, not in 8 KB blocks
        sys.stdout.reconfigure(line_buffering=True)
    args = with_eval_settings(command, args)
    try:
        preflight(command, args)

        import hydra

        import fewshot_runner.config  # noqa: F401

        sys.argv = [f"fewshot {command}", *args]
        entry = hydra.main(version_base="1.3", config_path=conf_dir(), config_name=command)(_task(command))
        try:
            entry()
        except SystemExit as e:
            if e.code not in (0, None):
                remove_refused_run_dir()
            raise
    except KeyboardInterrupt:  # Ctrl-C before a run installed its own handler, or between sweep jobs
        fail("interrupted", 130)


if __name__ == "__main__":  # python -m fewshot_runner.cli (the launcher's re-exec)
    main()
