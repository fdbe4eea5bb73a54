"""What a new user meets first (issue 18): the headline command trains the paper's setup, every preset
composes as it did, `fewshot list`, `fewshot train --help`, shell completion, and refused runs that
leave nothing behind.  The CLI runs in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_error_line, run_cli
from fewshot_runner.cli import conf_dir

CONF = Path(conf_dir())
HERE = Path(__file__).resolve().parent
# compose() of each case below, recorded at commit 4e712a3, before conf/paper/ and backbone=auto existed
BEFORE = json.loads((HERE / "compose_before_issue18.json").read_text())
# what the paper setups were meant to change, and nothing else
CHANGED_ON_PURPOSE = {
    "algo=protonet": {"data.train_n_way": 60, "data.train_n_query": 5, "train.steps": 2000},
    "algo=protonet data=omniglot": {"data.train_n_way": 60, "data.train_n_query": 5, "train.steps": 2000},
    "debug=smoke data=omniglot algo=maml": {"backbone.pool": False, "data.train_n_query": 1},
}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_presets_and_smoke_runs_compose_as_before_the_paper_setups(compose_cfg, case):
    """Every recorded key keeps its value (keys added to the schemas since are allowed: they are new)."""
    from omegaconf import OmegaConf

    now = flat(OmegaConf.to_container(compose_cfg(BEFORE[case]["overrides"]), resolve=False))
    expected = {**flat(BEFORE[case]["config"]), **CHANGED_ON_PURPOSE.get(case, {})}
    if "debug=smoke" in case:  # issue 18 too: the progress bar shows in a terminal whatever the preset
        expected["train.progress"] = True
    changed = {k: (v, now.get(k, "<missing>")) for k, v in expected.items() if now.get(k, "<missing>") != v}
    assert not changed, changed


def test_every_recorded_preset_is_still_there():
    """The record holds the six presets of 4e712a3; a preset added since has no 'before' to compare with."""
    recorded = {c.split("=", 1)[1] for c in BEFORE if c.startswith("experiment=") and " " not in c}
    assert len(recorded) == 6 and recorded <= {p.stem for p in (CONF / "experiment").glob("*.yaml")}


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_the_headline_command_trains_the_maml_papers_omniglot_setup(compose_cfg, algo):
    """`fewshot train algo=maml data=omniglot`: the strided net, 5-way 1-shot, 1 query per class in training,
    as experiment=maml_omniglot_5w1s, for 2,000 steps."""
    cfg = compose_cfg([f"algo={algo}", "data=omniglot"])
    preset = compose_cfg(["experiment=maml_omniglot_5w1s"])
    assert cfg.backbone == preset.backbone and cfg.backbone.pool is False
    for key in ("n_way", "n_shot", "n_query", "train_n_way", "train_n_shot", "train_n_query"):
        assert cfg.data[key] == preset.data[key], key
    assert (cfg.algo.inner_lr, cfg.algo.inner_steps, cfg.train.meta_batch_size) == (0.4, 1, 32)
    assert cfg.algo.first_order is (algo == "fomaml")
    assert cfg.train.steps == 2000
    if algo == "maml":
        assert compose_cfg([]) == cfg  # `fewshot train` alone is the headline


@pytest.mark.parametrize("algo", ["metasgd", "anil", "reptile"])
def test_the_maml_family_gets_its_papers_strided_omniglot_net(compose_cfg, algo):
    """Meta-SGD, ANIL and Reptile use MAML's Omniglot net in their papers: `algo=X data=omniglot` builds it
    (backbone=auto), any other backbone keeps its own; Reptile trains on 10 images per class (its "train shots"),
    Meta-SGD and ANIL on MAML's 1 + 1, for MAML's 2,000 steps."""
    cfg = compose_cfg([f"algo={algo}", "data=omniglot"])
    assert cfg.backbone.pool is False
    assert compose_cfg([f"algo={algo}", "data=omniglot", "backbone=conv4"]).backbone.pool is True
    assert compose_cfg([f"algo={algo}", "data=synthetic"]).backbone.pool is True
    shots = cfg.data.n_shot + (cfg.data.train_n_query if cfg.data.train_n_query is not None else cfg.data.n_query)
    assert shots == (10 if algo == "reptile" else 2)
    if algo != "reptile":
        assert cfg.train.steps == 2000 and cfg.train.meta_batch_size == 32


@pytest.mark.parametrize("overrides, optimizer, rate", [
    ([], "adam", 1e-3),                                            # the paper setup: Adam at its 1e-3
    (["algo.inner_optimizer=sgd"], "sgd", 0.1),                    # SGD brings its own rate, not Adam's
    (["algo.inner_optimizer=sgd", "algo.inner_lr=0.05"], "sgd", 0.05),  # a rate typed wins
    (["algo.inner_lr=5e-4"], "adam", 5e-4),                        # (the paper's 20-way rate)
])
def test_reptiles_inner_rate_follows_its_inner_optimizer(compose_cfg, overrides, optimizer, rate):
    """algo.inner_lr null is the inner optimizer's own rate: `algo=reptile data=omniglot algo.inner_optimizer=sgd`
    once ran SGD at the paper setup's Adam rate, 1e-3, and stayed at chance in training (2026-12-06)."""
    from fewshot_runner.engine.build import build_learner
    from fewshot_runner.engine.device import resolve_runtime

    cfg = compose_cfg(["algo=reptile", "data=omniglot", "device=cpu", *overrides])
    learner = build_learner(cfg, (1, 28, 28), 5, resolve_runtime(cfg.device))
    assert (learner.inner_optimizer, learner.inner_lr, learner.inner_opt().lr) == (optimizer, rate, rate)
    on_synthetic = build_learner(compose_cfg(["algo=reptile", "data=synthetic", "device=cpu"]), (1, 28, 28), 5,
                                 resolve_runtime(cfg.device))
    assert (on_synthetic.inner_optimizer, on_synthetic.inner_lr) == ("sgd", 0.1)  # the algo's own default


def test_command_line_and_presets_still_win_over_the_paper_setup(compose_cfg):
    base = ["algo=maml", "data=omniglot"]
    assert compose_cfg([*base, "backbone=conv4"]).backbone.pool is True
    assert compose_cfg([*base, "backbone=mlp"]).backbone._target_.endswith("MLP")
    assert compose_cfg([*base, "data.train_n_query=15"]).data.train_n_query == 15
    assert compose_cfg([*base, "train.steps=60000"]).train.steps == 60000
    assert compose_cfg([*base, "experiment=maml_omniglot_5w1s"]).train.steps == 4000
    smoke = compose_cfg(["algo=maml", "debug=smoke"])  # debug=smoke's synthetic data: no paper setup
    assert smoke.train.steps == 4 and smoke.data._target_.endswith("Synthetic") and smoke.backbone.pool is True
    # on other data the paper setup does not apply: MAML keeps the max-pool net and every query
    other = compose_cfg(["algo=maml", "data=synthetic"])
    assert other.backbone.pool is True and other.data.train_n_query is None and other.train.steps == 10000


def test_fewshot_list_names_every_config_in_every_group_with_its_description(cli):
    p = cli("list")
    assert p.returncode == 0, p.stderr
    for label in ("algorithms (algo=NAME)", "data sets (data=NAME)", "backbones (backbone=NAME)",
                  "optimizers (optimizer=NAME)", "devices (device=NAME)", "loggers (logger=NAME)",
                  "presets (experiment=NAME)"):
        assert label in p.stdout, label
    rows, section = {}, None
    for ln in p.stdout.splitlines():
        if ln and not ln.startswith(" "):
            section = re.search(r"\((\w+)=NAME\)", ln)
            section = section.group(1) if section else "paper"
        elif ln.startswith("  ") and not ln.startswith("   "):
            rows[(section, ln.split()[0])] = ln
    for path in sorted(CONF.glob("*/*.yaml")):
        group, name = path.parent.name, path.stem
        text = next(ln.lstrip("#").strip() for ln in path.read_text().splitlines()
                    if ln.startswith("#") and "@package" not in ln)
        row = rows.get(("paper", f"{group}/{name}") if group.startswith("paper") else (group, name))
        assert row is not None, f"{group}={name} is not listed"
        assert " ".join(text.split()[:3]) in row, (row, text)  # its first comment line, wrapped to the terminal


def test_train_help_names_the_tool_hides_internal_groups_and_describes_the_keys(cli):
    p = cli("train", "--help")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.startswith("fewshot train: ") and "Hydra" not in out.split("\n\n")[0]
    groups = out.split("Config groups")[1].split("Keys")[0]
    assert "powered by Hydra" not in out and "schema/" not in out and "paper" not in groups
    for group in ("algo", "data", "backbone", "optimizer", "device", "logger", "experiment", "debug"):
        assert f"  {group}: {', '.join(sorted(f.stem for f in (CONF / group).glob('*.yaml')))}\n" in groups, group
    rows = {ln.split("=", 1)[0].strip(): ln for ln in out.splitlines() if re.match(r"  [a-z_.]+=", ln)}
    assert "classes per validation/test episode" in rows["data.n_way"]
    assert "adaptation steps per task in training" in rows["algo.inner_steps"]
    assert "stop | skip" in rows["train.on_nan"]
    assert rows["backbone.pool"].startswith("  backbone.pool=false")  # the values of this command line
    p = cli("train", "algo=protonet", "--help")
    assert "algo.rotate_support=false" in p.stdout and "algo.inner_lr" not in p.stdout
    p = cli("eval", "--help")
    assert p.returncode == 0 and p.stdout.startswith("fewshot eval: ") and "checkpoint=???" in p.stdout
    assert "algo: " not in p.stdout.split("Keys")[0]  # eval's groups are device and logger


def _complete(line: str, words: list[str], shell: str = "bash") -> list[str]:
    """What the installed completion function answers for `line` (COMP_WORDS as bash splits it)."""
    script = subprocess.run([sys.executable, "-m", "fewshot_runner.cli", "completion", shell], capture_output=True,
                            text=True, check=True).stdout
    if shell == "zsh":  # no zsh here: check the script's bash part, which zsh runs through bashcompinit
        assert script.splitlines()[1] == "autoload -Uz bashcompinit && bashcompinit"
        script = "\n".join(ln for ln in script.splitlines() if "bashcompinit" not in ln)
    bindir = Path(sys.executable).parent
    assert (bindir / "fewshot").exists()
    prog = f"""{script}
COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=({' '.join(repr(w) for w in words)})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_fewshot_completion
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "--norc", "-c", prog], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_offers_candidates_for_train_al_tab(shell):
    assert _complete("fewshot train al", ["fewshot", "train", "al"], shell) == ["algo.", "algo="]
    # bash splits `algo=rep` into `algo`, `=`, `rep`: the reply replaces the last part only
    assert _complete("fewshot train algo=rep", ["fewshot", "train", "algo", "=", "rep"], shell) == ["reptile "]
    many = sorted(f"{p.stem} " for p in (CONF / "algo").glob("ma*.yaml"))  # maml, mamlpp, mann, matchingnet
    assert len(many) > 1 and sorted(_complete("fewshot train algo=ma", ["fewshot", "train", "algo", "=", "ma"],
                                              shell)) == many
    assert _complete("fewshot tr", ["fewshot", "tr"], shell) == ["train "]


def test_completion_query_lists_options_and_keys_and_hides_internal_groups(tmp_path):
    def query(line):
        env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
        p = subprocess.run([sys.executable, "-m", "fewshot_runner.cli", "-sc", "query=bash"], capture_output=True,
                           text=True, env=env, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    assert query("fewshot train algo=") == sorted(f"algo={f.stem}" for f in (CONF / "algo").glob("*.yaml"))
    assert query("fewshot train algo=p") == ["algo=protonet"]
    assert set(query("fewshot train data.n_")) == {"data.n_way=", "data.n_shot=", "data.n_query="}
    every = query("fewshot train ")
    assert "experiment=" in every and not any(c.startswith(("schema", "paper")) for c in every)
    assert "algo=" not in query("fewshot eval ") and "checkpoint=" in query("fewshot eval ")
    (tmp_path / "runs").mkdir()
    assert query(f"fewshot eval checkpoint={tmp_path}/ru") == [f"checkpoint={tmp_path}/runs/"]
    # the command Hydra's own install printed (`fewshot train -sc install=bash`) now installs this script
    p = subprocess.run([sys.executable, "-m", "fewshot_runner.cli", "train", "-sc", "install=bash"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "complete -o nospace -o default -F _fewshot_completion fewshot" in p.stdout


# ----------------------------------------------------------------------------- refusals
def test_a_run_refused_after_hydra_started_leaves_no_run_dir(cli, tmp_path):
    """n_way larger than the classes is found once the data set is built, after Hydra made the run dir:
    the run takes away the folders it made (here outputs/DATE/TIME, all three) and no cli.log is written."""
    p = cli("train", "debug=smoke", "data.n_way=100", cwd=tmp_path)
    one_error_line(p, "data.n_way=100", "classes")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_run_keeps_a_folder_that_existed_and_its_files(cli, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    p = cli("train", "debug=smoke", "data.n_way=100", f"hydra.run.dir={run}")
    one_error_line(p, "data.n_way=100")
    assert sorted(x.name for x in run.iterdir()) == ["notes.txt"]


def test_a_refused_run_next_to_other_runs_removes_only_its_own_folder(cli, tmp_path):
    other = tmp_path / "outputs" / "2026-01-01" / "00-00-00"
    other.mkdir(parents=True)
    (other / "results.json").write_text("{}")
    p = cli("train", "debug=smoke", "data.n_way=100", cwd=tmp_path)
    one_error_line(p, "data.n_way=100")
    assert sorted(str(x.relative_to(tmp_path)) for x in tmp_path.rglob("*")) == [
        "outputs", "outputs/2026-01-01", "outputs/2026-01-01/00-00-00", "outputs/2026-01-01/00-00-00/results.json"]


@pytest.mark.slow  # (the default tier's time: test_cli's test_maml_smoke_and_eval_refuses_other_way is the same refusal)
def test_a_20_way_eval_of_a_5_way_maml_model_leaves_no_eval_dir(cli, tmp_path):
    run = tmp_path / "run"
    p = cli("train", "debug=smoke", "algo=maml", "logger=none", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (run / "cli.log").exists() and not list(run.glob("*.log"))  # no empty log file in a run
    p = cli("eval", f"checkpoint={run / 'checkpoints' / 'best.pt'}", "data.n_way=20", "device=cpu", cwd=tmp_path)
    one_error_line(p, "5-way head", "data.n_way=5")
    assert not (tmp_path / "outputs").exists()


def test_a_text_file_given_as_checkpoint_is_named_as_such(cli, tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("these are my notes, not a model\n")
    line = one_error_line(cli("eval", f"checkpoint={notes}", "device=cpu"), "is not a fewshot checkpoint",
                          "a text file")
    assert "Error" not in line and "corrupt" not in line
    one_error_line(cli("train", "debug=smoke", f"resume={notes}"), "is not a fewshot checkpoint")
    png = tmp_path / "picture.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    one_error_line(cli("eval", f"checkpoint={png}", "device=cpu"), "is not a fewshot checkpoint (not a torch file)")


def test_one_way_episodes_and_unknown_added_keys_are_refused_in_one_line(cli, tmp_path):
    one_error_line(cli("train", "debug=smoke", "data.n_way=1"), "data.n_way=1", "2 or more")
    one_error_line(cli("train", "debug=smoke", "+nosuch.key=1"), "unknown config key 'nosuch.key'")
    one_error_line(cli("train", "debug=smoke", "-m", "++train.stepz=3,4"), "unknown config key 'train.stepz'")
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
    # a key a schema declares may be set with ++, hydra.* keys may be added, and eval's algo.* are the learner's
    from fewshot_runner.cli import preflight

    preflight("train", ["debug=smoke", "++train.steps=2", "+hydra.job.env_set.FEWSHOT_X=1",
                        f"hydra.run.dir={tmp_path / 'r'}"])


def test_tab_completion_in_an_interactive_bash(tmp_path):
    """The installed function as readline runs it, keys typed into a real interactive bash on a pty."""
    import pty
    import select
    import time

    bindir = Path(sys.executable).parent
    (tmp_path / "runs").mkdir()
    pid, fd = pty.fork()
    if pid == 0:  # the child: a bare interactive bash with the venv's fewshot on its path
        os.environ.update(PATH=f"{bindir}:{os.environ['PATH']}", PS1="$ ", HOME=str(tmp_path))
        os.chdir(tmp_path)
        os.execvp("bash", ["bash", "--norc", "--noprofile", "-i"])

    def typed(keys: bytes, wait: float = 8.0, until: bytes | None = None) -> str:
        os.write(fd, keys)
        out, end = b"", time.time() + wait
        while time.time() < end and not (until and until in out):
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|[\x07\r]", "", out.decode(errors="replace"))  # no bells, escapes

    try:
        typed(b'eval "$(fewshot completion bash)"\n', until=b"$ ")
        assert "algo" in typed(b"fewshot train al\t", until=b"go")  # algo. and algo=: their common part, and a bell
        assert "=reptile " in typed(b"=rep\t", until=b"reptile ")  # bash breaks the word at '=': no algo==reptile
        listed = typed(b"\x15fewshot train algo=\t\t", until=b"protonet")
        assert "protonet" in listed and "maml" in listed and "==" not in listed
        assert "protonet " in typed(b"pro\t", until=b"protonet ")
        assert "data.n_way=" in typed(b"\x15fewshot train data.n_w\t", until=b"n_way=")
        assert "runs/" in typed(b"\x15fewshot eval checkpoint=ru\t", until=b"runs/")
    finally:
        os.write(fd, b"\x15exit\n")
        os.close(fd)
        os.waitpid(pid, 0)
