"""Shared fixtures: config composition, the real Omniglot folder, CLI subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import fewshot_runner.config  # noqa: F401  (registers the schemas)
from fewshot_runner.cli import ALLOCATOR_ENV, conf_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def toy_episodes(n_tasks=5, n_way=3, n_query=2, dtype=None, seed=0, size=16):
    """A batch of random 1-channel episodes (float64 unless ``dtype``), labels in order."""
    import torch

    from fewshot_runner.episode import Episode

    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float64
    sx = torch.rand(n_tasks, n_way, 1, size, size, generator=g, dtype=dtype)
    qx = torch.rand(n_tasks, n_way * n_query, 1, size, size, generator=g, dtype=dtype)
    sy = torch.arange(n_way).repeat(n_tasks, 1)
    qy = torch.arange(n_way).repeat_interleave(n_query).repeat(n_tasks, 1)
    return Episode(sx, sy, qx, qy, n_way)


def real_data_root() -> Path | None:
    """The folder holding omniglot/ (CI and dev machines: ../shared/data), or $FEWSHOT_DATA.

    ``FEWSHOT_TESTS_WITHOUT_DATA=1``: None, as on a machine with no Omniglot copy (to see that only the
    tests that need the real data skip there)."""
    if os.environ.get("FEWSHOT_TESTS_WITHOUT_DATA", "") not in ("", "0"):
        return None
    for cand in (os.environ.get("FEWSHOT_DATA"), SHARED_DATA):
        if cand and (Path(cand) / "omniglot").exists():
            return Path(cand)
    return None


@pytest.fixture(scope="module")
def one_thread():
    """Tiny float64 ops on one intra-op thread: with two, a core busy elsewhere made such tests 200x slower
    here (OpenMP threads waiting on the busy core). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_cfg():
    def _compose(overrides=(), name="train"):
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))

    return _compose


@pytest.fixture
def omniglot_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("no Omniglot copy: put it in ../shared/data/omniglot or set FEWSHOT_DATA")
    return root


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 300,
            input_signal=None, reexec: bool = False) -> subprocess.CompletedProcess:
    """Run the real `fewshot` CLI in a subprocess (python -m fewshot_runner.cli).

    The launcher's allocator variables (``cli.ALLOCATOR_ENV``) are set unless already set or ``reexec``, so the
    process starts one interpreter instead of re-executing itself into a second (about 0.35 s of CPU a run here;
    `make test` exports them already, a bare pytest did not); tests/test_cli.py's console-script test runs the
    real re-exec path."""
    env = dict(os.environ)
    env.setdefault("FEWSHOT_DATA", str(real_data_root() or cwd / "no-data"))
    env.pop("COMET_API_KEY", None)  # never log tests with the developer's Comet key
    if not reexec:
        env.update({k: v for k, v in ALLOCATOR_ENV.items() if not env.get(k)})
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fewshot_runner.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exactly one `error: ...` line on stderr holding each fragment, no traceback."""
    assert p.returncode != 0
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- a learner's smoke, eval and resume
# The check of every learner, through the real CLI in subprocesses: `fewshot train algo=NAME debug=smoke`,
# `fewshot eval` of its best.pt, and a run killed between checkpoints that `resume=auto` ends bitwise equal to the
# unbroken one. Each tests/algorithms/test_NAME.py adds its own assertions on what these return.

# 4 steps, last.pt at 2 and 4, validation at 2 and 4, a log record a step: what kill_and_resume's kill in step 3 needs
RESUMABLE_STEPS = ["train.steps=4", "train.ckpt_every=2", "train.val_every=2", "train.log_every=1"]


def smoke_train(root: Path, args: list[str]) -> tuple[Path, subprocess.CompletedProcess]:
    """`fewshot train ARGS hydra.run.dir=ROOT/run` in ROOT succeeds: the run folder and the finished process."""
    run = root / "run"
    p = run_cli(["train", *args, f"hydra.run.dir={run}"], root)
    assert p.returncode == 0, p.stderr[-2000:]
    return run, p


def smoke_eval(run: Path, cwd: Path, *overrides: str) -> dict:
    """`fewshot eval checkpoint=RUN/checkpoints/best.pt OVERRIDES device=cpu hydra.run.dir=CWD/ev` succeeds with a
    test accuracy in [0, 1]: its results.json."""
    ev = cwd / "ev"
    p = run_cli(["eval", f"checkpoint={run / 'checkpoints' / 'best.pt'}", *overrides, "device=cpu",
                 f"hydra.run.dir={ev}"], cwd)
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.loads((ev / "results.json").read_text())
    assert 0 <= results["test/acc"] <= 1
    return results


def kill_and_resume(args: list[str], unbroken: Path, cwd: Path) -> tuple[Path, dict]:
    """`fewshot train ARGS` (ARGS hold RESUMABLE_STEPS) killed (SIGKILL) in step 3 with last.pt at step 2, then
    resumed with resume=auto: it ends bitwise equal to the UNBROKEN run of the same ARGS (test_faults.assert_same_run).
    Returns the run folder and last.pt as the kill left it (torch.load)."""
    import torch
    from test_faults import assert_same_run, fewshot, killed, ok, step_of

    run = cwd / "run"
    killed(fewshot([*args, f"hydra.run.dir={run}"], cwd, fault="kill@step:3"))
    assert step_of(run / "checkpoints" / "last.pt") == 2
    at_kill = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ok(fewshot([*args, f"hydra.run.dir={run}", "resume=auto"], cwd))
    assert_same_run(unbroken, run)
    return run, at_kill


@pytest.fixture
def cli(tmp_path):
    def _run(*args, **kw):
        return run_cli(list(args), kw.pop("cwd", tmp_path), **kw)

    return _run


def pytest_runtest_setup(item):
    """One convention for `gpu`-marked tests (deselected by default): selected without a CUDA GPU,
    they fail with a message, never skip silently."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.fail("the gpu tests need a CUDA GPU visible to torch (run them with -m gpu on a GPU machine)")
