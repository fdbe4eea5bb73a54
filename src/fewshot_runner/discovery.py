"""What a user can choose, and how to find it: ``fewshot list``, ``fewshot train|eval --help`` and shell
completion (``fewshot completion bash|zsh``).

Every description comes from where the thing is defined, so none can drift: a config file's first comment
line (``conf/GROUP/NAME.yaml``), a key's comment in its dataclass schema (``config.py``: the comment on the
field's line, else the comment lines right above it).  No torch here: these answer in about a second.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

# the groups a user picks from, in the order of the command line (`fewshot train algo=maml data=omniglot`),
# with what `fewshot list` calls them; any other folder of conf/ follows under its own name
GROUPS = {"algo": "algorithms", "data": "data sets", "backbone": "backbones", "optimizer": "optimizers",
          "device": "devices", "logger": "loggers", "experiment": "presets", "debug": "debug presets"}
# folders of conf/ that are not choices: Hydra's own, and the paper setups applied by algo x data
INTERNAL = ("hydra", "paper", "paper_net")
COMMANDS = {"train": "train a meta-learner, keep the best model on validation classes, test it",
            "eval": "re-test a saved run: fewshot eval checkpoint=PATH [data.n_way=20]",
            "predict": "classify your own images: fewshot predict checkpoint=PATH support=DIR query=DIR [out=FILE.csv]",
            "list": "the algorithms, data sets, backbones, optimizers, devices, loggers and presets",
            "completion": "print the shell completion script: eval \"$(fewshot completion bash)\" (or zsh)",
            "data": "fewshot data check|prepare data=NAME: is the data set there (what to get), build its cache"}
COMMAND_GROUPS = {"train": None, "eval": ("device", "logger"), "predict": ("device",)}  # None: every group


def conf_root() -> Path:
    from fewshot_runner.config import conf_dir

    return Path(conf_dir())


# ----------------------------------------------------------------------------- config files
def description(path: Path) -> str:
    """The first comment line of a YAML config, without Hydra's ``# @package`` directive."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    for ln in lines:
        s = ln.strip()
        if not s:
            continue
        if not s.startswith("#"):
            break
        text = s.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text
    return ""


def group_options(group: str) -> list[str]:
    folder = conf_root() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def user_groups(command: str = "train") -> list[str]:
    """The config groups of ``command`` a user chooses from: GROUPS' order first, internal ones left out."""
    root = conf_root()
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in INTERNAL
                   and not p.name.startswith(("_", ".")) and any(p.glob("*.yaml")))
    ordered = [g for g in GROUPS if g in found] + [g for g in found if g not in GROUPS]
    allowed = COMMAND_GROUPS.get(command)
    return [g for g in ordered if allowed is None or g in allowed]


def list_text() -> str:
    """``fewshot list``: every option of every group with its one-line description, then the paper setups."""
    root = conf_root()
    out = []
    for group in user_groups("train"):
        names = group_options(group)
        out.append(f"{GROUPS.get(group, group)} ({group}=NAME)")
        width = max(len(n) for n in names) + 2
        out += [_item(n, description(root / group / f"{n}.yaml"), width) for n in names]
        out.append("")
    papers = [p for folder in ("paper", "paper_net") for p in sorted((root / folder).glob("*.yaml"))]
    if papers:
        out.append("paper setups (not chosen by hand: algo=ALGO data=DATA loads paper/ALGO_DATA.yaml, and with "
                   "backbone=auto paper_net/ALGO_DATA_auto.yaml)")
        names = [f"{p.parent.name}/{p.stem}" for p in papers]
        width = max(len(n) for n in names) + 2
        out += [_item(n, description(p), width) for n, p in zip(names, papers)]
        out.append("")
    out.append("Pick one per group on the command line (fewshot train algo=protonet experiment=...); "
               "`fewshot train --help` lists every key.")
    return "\n".join(out)


def _item(name: str, text: str, width: int) -> str:
    cols = max(60, shutil.get_terminal_size((100, 24)).columns)
    lines = textwrap.wrap(text, max(30, cols - width - 2)) or [""]
    first = f"  {name:<{width}}{lines[0]}"
    return "\n".join([first, *(" " * (width + 2) + ln for ln in lines[1:])])


# ----------------------------------------------------------------------------- key descriptions
@lru_cache(maxsize=1)
def field_comments() -> dict[str, dict[str, str]]:
    """``{class name: {field: description}}`` from the comments of config.py and of the group schemas
    (fewshot_runner/schemas/)."""
    import inspect
    import sys

    import fewshot_runner.config as config
    from fewshot_runner.schemas import all_schemas

    modules = {config.__name__, *(cls.__module__ for cls in all_schemas().values()),
               *(m for m in list(sys.modules) if m.startswith("fewshot_runner.schemas."))}  # (predict's run schema)
    out: dict[str, dict[str, str]] = {}
    for name in sorted(modules):
        out.update(_module_field_comments(inspect.getsource(sys.modules[name])))
    return out


def _module_field_comments(src: str) -> dict[str, dict[str, str]]:
    """``{class name: {field: description}}`` of one module's source: a field's trailing comment, else the
    whole-line comments just above it."""
    import ast
    import io
    import tokenize

    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whole-line comment)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
    out: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        for st in node.body:
            if not (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)):
                continue
            text = [comments[ln][0] for ln in range(st.lineno, (st.end_lineno or st.lineno) + 1)
                    if ln in comments and not comments[ln][1]]
            if not text:
                ln = st.lineno - 1
                while ln in comments and comments[ln][1]:
                    text.insert(0, comments[ln][0])
                    ln -= 1
            if text:
                fields[st.target.id] = " ".join(t for t in text if t)
        out[node.name] = fields
    return out


def key_description(node, key: str) -> str:
    """The schema comment of ``key`` in the structured config ``node`` (its dataclass or a base class)."""
    from omegaconf import OmegaConf

    try:
        cls = OmegaConf.get_type(node)
    except Exception:  # noqa: BLE001  (a plain dict or list: no schema)
        return ""
    comments = field_comments()
    for klass in getattr(cls, "__mro__", ()):
        text = comments.get(klass.__name__, {}).get(key)
        if text:
            return text
    return ""


def _leaves(node, prefix: str = ""):
    """(dotted key, value as text, description) of every leaf of a config; ``_target_`` left out."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    for key in node.keys():
        if key == "_target_":
            continue
        full, child = f"{prefix}{key}", node._get_node(key)
        special = child._is_none() or child._is_missing() or child._is_interpolation()
        if isinstance(child, DictConfig) and not special and len(child) > 0:
            yield from _leaves(child, f"{full}.")
            continue
        if child._is_missing():
            value = "???"
        elif special:
            value = child._value()
        elif isinstance(child, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(child, resolve=False)
        else:
            value = child._value()
        yield full, _show(value), key_description(node, key)


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


# ----------------------------------------------------------------------------- --help
def help_text(command: str, overrides: list[str]) -> str:
    """``fewshot train|eval --help``: what the command does, its groups and every key with its value (for
    these overrides) and its description from the schema."""
    from hydra import compose, initialize_config_dir

    import fewshot_runner.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(conf_root()), version_base="1.3", job_name=f"fewshot_{command}"):
        cfg = compose(config_name=command, overrides=overrides)
    cols = max(72, min(shutil.get_terminal_size((110, 24)).columns, 140))
    out = [f"fewshot {command}: {COMMANDS[command]}.", ""]
    if command == "train":
        out += ["usage: fewshot train [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job] [--help]",
                "  e.g. fewshot train algo=maml data=omniglot        the MAML paper's Omniglot setup (conf/paper/)",
                "       fewshot train experiment=protonet_omniglot_quick   a preset",
                "       fewshot train -m algo=maml,protonet data.n_shot=1,5   a sweep (-m), a summary at the end",
                "       fewshot train debug=smoke                     seconds on a CPU: synthetic data, 4 steps"]
    elif command == "predict":
        out += ["usage: fewshot predict checkpoint=PATH support=DIR query=DIR [out=FILE.csv] [KEY=VALUE ...] [--help]",
                "  e.g. fewshot predict checkpoint=outputs/DATE/TIME/checkpoints/best.pt support=my/support query=my/query",
                "  support/<class_name>/* holds each class's labelled images, query/* the images to classify; the CSV "
                "and predictions.png go to the run dir (or the CSV to out=)."]
    else:
        out += ["usage: fewshot eval checkpoint=PATH [KEY=VALUE ...] [--help]",
                "  e.g. fewshot eval checkpoint=outputs/DATE/TIME/checkpoints/best.pt data.n_way=20 data.n_query=5",
                "  data.* (episode shape, root) and algo.* (test-time settings the learner allows) change the "
                "checkpoint's own; unset keys keep them."]
    out += ["", "Config groups (GROUP=OPTION; `fewshot list` says what each option is):"]
    out += [f"  {g}: {', '.join(group_options(g))}" for g in user_groups(command)]
    out += ["", "Keys (KEY=VALUE), with their values for this command line" + (f" ({' '.join(overrides)})" if overrides
                                                                            else "") + ":"]
    rows = list(_leaves(cfg))
    width = min(max(len(f"{k}={v}") for k, v, _ in rows) + 3, 44)
    for key, value, text in rows:
        left = f"  {key}={value}"
        if not text:
            out.append(left)
            continue
        wrapped = textwrap.wrap(text, max(30, cols - width - 2))
        if len(left) > width:
            out.append(left)
            out += [" " * width + ln for ln in wrapped]
        else:
            out.append(f"{left:<{width}}{wrapped[0]}")
            out += [" " * width + ln for ln in wrapped[1:]]
    out += ["", "`fewshot " + command + " --cfg job` prints the whole composed config; `--hydra-help` lists Hydra's own "
            "flags; shell completion: eval \"$(fewshot completion bash)\"."]
    return "\n".join(out)


# ----------------------------------------------------------------------------- shell completion
_SCRIPT = r'''# fewshot shell completion ({shell}): add   eval "$(fewshot completion {shell})"   to {rc}
{preamble}_fewshot_completion() {{
    local line="${{COMP_LINE:0:$COMP_POINT}}"
    local cur="${{line##*[[:space:]]}}"
    # bash (not zsh) also breaks words at '=' and ':' (COMP_WORDBREAKS): readline then replaces only the
    # text after the last of them, so the reply leaves out what comes before it
    local breaks="" head=""
    [[ "${{COMP_WORDBREAKS-}}" == *=* ]] && breaks+="="
    [[ "${{COMP_WORDBREAKS-}}" == *:* ]] && breaks+=":"
    [[ -n "$breaks" ]] && head="${{cur%"${{cur##*[$breaks]}}"}}"
    local IFS=$'\n' c
    local -a found
    found=($(COMP_LINE="$line" COMP_POINT="${{#line}}" command fewshot -sc query={shell} 2>/dev/null))
    COMPREPLY=()
    for c in "${{found[@]}}"; do
        [[ "$c" == *[=./] ]] || c="$c "
        COMPREPLY+=("${{c#"$head"}}")
    done
}}
complete -o nospace -o default -F _fewshot_completion fewshot
'''


def completion_script(shell: str) -> str:
    if shell == "zsh":
        return _SCRIPT.format(shell="zsh", rc="~/.zshrc",
                              preamble="autoload -Uz bashcompinit && bashcompinit\n")
    return _SCRIPT.format(shell="bash", rc="~/.bashrc", preamble="")


def complete(line: str) -> list[str]:
    """Candidates for the last word of ``line`` (a command line up to the cursor, ``fewshot`` first)."""
    words = line.split()
    new_word = not line or line[-1].isspace()
    args = words[1:]  # the program's own name (or path) first
    if not args or (len(args) == 1 and not new_word):
        cur = "" if not args else args[0]
        return [c for c in [*COMMANDS, "--help", "--version"] if c.startswith(cur)]
    command, rest = args[0], args[1:]
    cur = "" if new_word else rest[-1] if rest else ""
    if command == "completion":
        return [s for s in ("bash", "zsh") if s.startswith(cur)] if len(rest) <= 1 else []
    if command not in ("train", "eval", "predict"):
        return []
    if cur.startswith("-"):
        flags = ["--help", "--cfg", "--hydra-help", "--resolve"] + (["-m", "--multirun"] if command == "train" else [])
        return [f for f in flags if f.startswith(cur)]
    rest_line = " ".join(rest) + (" " if new_word and rest else "")
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.core_plugins.bash_completion import BashCompletion
        from hydra._internal.utils import create_config_search_path

        import fewshot_runner.config  # noqa: F401

        loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_root())))
        found = BashCompletion(loader)._query(config_name=command, line=rest_line)
    except Exception:  # noqa: BLE001  (a line Hydra cannot parse yet: nothing to offer)
        return []
    hidden = ("schema/", "schema=", "paper/", "paper=", "paper.", "paper_net")
    groups = {p.name for p in conf_root().iterdir() if p.is_dir()}
    allowed = set(user_groups(command))
    out = []
    for c in found:
        bare = c.lstrip("+~")
        name, eq, value = bare.partition("=")
        if bare.startswith(hidden) or bare == "hydra" or (eq and name in groups and name not in allowed):
            continue
        if eq and name not in groups and value and Path(value).expanduser().is_dir() and not value.endswith("/"):
            c += "/"  # a folder on the way to a file (checkpoint=, resume=, data.root=)
        out.append(c)
    return out


def query(shell: str) -> None:
    """``fewshot -sc query=SHELL`` (what the completion function calls): one candidate per line."""
    del shell  # the same candidates for bash and zsh (bashcompinit)
    line = os.environ.get("COMP_LINE", "")
    point = os.environ.get("COMP_POINT")
    if point is not None and point.isdigit():
        line = line[: int(point)]
    print("\n".join(complete(line)))


def shell_completion(arg: str | None) -> None:
    """``-sc install=SHELL | query=SHELL | uninstall=SHELL`` (Hydra's flag, for one command or all)."""
    from fewshot_runner.errors import fail

    action, _, shell = (arg or "").partition("=")
    shell = shell or "bash"
    if shell not in ("bash", "zsh") or action not in ("install", "query", "uninstall"):
        fail(f"-sc {arg or ''}: use -sc install=bash or install=zsh (or: eval \"$(fewshot completion bash)\")")
    if action == "install":
        print(completion_script(shell))
    elif action == "uninstall":
        print("complete -r fewshot 2>/dev/null; unset -f _fewshot_completion")
    else:
        query(shell)
    sys.stdout.flush()
