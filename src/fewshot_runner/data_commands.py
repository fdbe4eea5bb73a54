"""``fewshot data check|prepare data=<name> [data.KEY=V ...]``: is the data set usable, and build its cache.

check: what was found under the data set's root, what is missing, and exactly which files to get and
    where to put them; then the split check (classes per split, images per class, the split's checksum)
    and whether the image store (cache) is built. Nothing is decoded. Exit 0 when the data is usable,
    2 when not.
prepare: loads the data set as training would, building its cache (or image store) with a progress bar,
    then prints the splits. Exit 0, or 2 with one line saying what is wrong.

A data set says how to be checked by an ``inspect`` attribute on the function its config names
(``MiniImageNet.inspect``: same arguments, returns a ``data.published.Inspection``). One without it
(Omniglot, synthetic) is checked by loading it: its loader's own one-line errors say what is missing.
"""

from __future__ import annotations

import sys

from fewshot_runner.errors import fail

USAGE = ("usage: fewshot data check|prepare data=NAME [data.root=PATH] [data.KEY=VALUE ...]\n"
         "  check    what is under the data set's root, what is missing and where to get it (exit 2: not usable)\n"
         "  prepare  build the data set's cache (decoded images) with a progress bar, then list its splits")


def main(args: list[str]) -> None:
    """``fewshot data ...``: exits 0 (usable / prepared) or non-zero with one line on stderr."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    action, overrides = args[0], args[1:]
    if action not in ("check", "prepare"):
        fail(f"unknown data command {action!r}: use fewshot data check data=NAME or fewshot data prepare data=NAME")
    bad = [a for a in overrides if "=" not in a or a.startswith("-")]
    if bad:
        fail(f"fewshot data {action} takes data=NAME and data.KEY=VALUE overrides, not {bad[0]!r}")
    if not any(a.split("=", 1)[0].lstrip("+~") == "data" for a in overrides):
        fail(f"fewshot data {action} needs the data set: e.g. fewshot data {action} data=miniimagenet data.root=PATH")
    from fewshot_runner.errors import UserError

    try:
        data_cfg = _compose(overrides)
        (check if action == "check" else prepare)(data_cfg)
    except UserError as e:
        fail(str(e), getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def _compose(overrides: list[str]):
    """The ``data`` node of the train config with these overrides; a bad override is one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fewshot_runner.config import conf_dir  # (importing it registers the schemas)
    from fewshot_runner.preflight import exception_text, one_line

    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name="fewshot_data"):
            return compose(config_name="train", overrides=overrides).data
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(one_line(exception_text(e)))


def _target(data_cfg):
    """(the function the config names, the config's keys that are its arguments): the episode-shape, transform
    and loader keys every data config holds are not (as ``engine.build.build_dataset`` drops them)."""
    import inspect

    from hydra.utils import get_method
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(data_cfg, resolve=True)
    target = node.pop("_target_")
    if not target.startswith("fewshot_runner.data."):
        fail(f"data._target_={target} is not a data set of fewshot_runner.data: fewshot data works with those")
    fn = get_method(target)
    params = inspect.signature(fn).parameters
    return fn, {k: v for k, v in node.items() if k in params}


def check(data_cfg) -> None:
    from fewshot_runner.data.published import MissingData

    fn, kwargs = _target(data_cfg)
    inspect = getattr(fn, "inspect", None)
    if inspect is None:
        print(f"{fn.__name__}: no file listing for this data set; loading it instead (fewshot data prepare)")
        return prepare(data_cfg)
    try:
        found = inspect(**kwargs)
        found.check()
    except MissingData as e:
        _say_missing(e)
        raise SystemExit(2) from None
    layout = found.layout
    print(f"{layout.what}: found under {layout.root} ({layout.form}):")
    for f in layout.found:
        print(f"  {f}")
    print(f"split: {_sizes(found.names, layout.counts)}; checksum {_checksum(found.names)}")
    store = found.store_path
    state = "present" if store.is_file() else "not built yet: fewshot data prepare builds it, training does too"
    print(f"image store: {store} ({state})")
    print("usable: yes")


def _say_missing(e) -> None:
    """A usable report on stdout, the one-line reason on stderr (as every refusal)."""
    for f in e.found:
        print(f"found:   {f}")
    for m in e.missing[:20]:
        print(f"missing: {m}")
    if len(e.missing) > 20:
        print(f"missing: ... {len(e.missing) - 20} more")
    if e.get:
        print(f"to fix:  {e.get}")
    sys.stdout.flush()
    print(f"error: {e}", file=sys.stderr)


def prepare(data_cfg) -> None:
    fn, kwargs = _target(data_cfg)
    dataset = fn(**kwargs)  # (what engine.build.build_dataset instantiates, without importing the engine)
    splits = {s: dataset.splits[s] for s in ("train", "val", "test") if s in dataset.splits}
    print(f"{fn.__name__}: ready; images {tuple(dataset.x_shape)}")
    for name, split in splits.items():
        counts = getattr(split, "counts", None)
        if counts is None:  # (a regression data set's split: no classes)
            print(f"  {name}")
            continue
        print(f"  {name:5s} {split.n_classes:5d} classes {int(counts.sum()):8d} images "
              f"({split.min_per_class} to {int(counts.max())} per class)")
    print(f"split checksum {dataset.split_checksum}")
    path = getattr(getattr(next(iter(splits.values())), "images", None), "path", None)
    if path:
        print(f"image store: {path}")


def _sizes(names: dict, counts: dict) -> str:
    return ", ".join(f"{s} {len(v)} classes / {sum(counts[c] for c in v)} images" for s, v in names.items())


def _checksum(names: dict) -> str:
    from fewshot_runner.data.published import split_checksum

    return split_checksum(names)
