"""Checkpoints: plain data + tensors, written atomically, loaded with ``weights_only=True``.

Format (a dict): format, package_version, config (resolved, plain containers), step,
model, ema (None, or the weight average of ``train.ema_decay``: {decay, updates, weights}; where
present, evaluation uses its weights and resume the model's), optimizer, scheduler, sampler, rng
{python, numpy, torch}, best_val_acc, best_step, log_window, wall_time.  Files written before the
ema entry existed have none, which reads as no average.

Writing: the bytes go to a temporary file beside the target, are flushed and fsynced, then
renamed over it (and the folder is fsynced), so a kill or a full disk during a save leaves
the previous file intact.  Reading: ``torch.load(weights_only=True)`` only (it cannot be
turned off by ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``, since it is passed explicitly); a file
holding any other pickled object is refused, and the config inside must be plain data.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from fewshot_runner import __version__
from fewshot_runner.errors import CheckpointError, UserError

FORMAT = 1
REQUIRED_KEYS = ("format", "config", "model", "step")
TMP_SUFFIX = ".tmp"
_PLAIN = (str, int, float, bool, type(None))
# `fewshot eval` instantiates the saved config's `_target_`s: only these (see check_targets)
TARGET_PREFIXES = {"data": "fewshot_runner.data.", "backbone": "fewshot_runner.backbones.",
                   "algo": "fewshot_runner.algorithms.", "optimizer": "torch.optim."}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write_fn: Callable[[Any], Any],
                 before_commit: Callable[[Any], None] | None = None) -> None:
    """Call ``write_fn(fileobj)`` on a temporary file beside ``path``, fsync, then rename.

    A kill or a full disk during the write leaves any previous ``path`` untouched; an
    ``OSError`` becomes a one-line :class:`UserError`.  ``before_commit(fileobj)`` runs after
    the data is written and flushed, before the fsync and the rename (a testing hook: see
    ``FEWSHOT_FAULT`` in :mod:`fewshot_runner.engine.run`).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            if before_commit is not None:
                before_commit(f)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        if tmp is not None:
            _remove_quietly(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device while writing {path}; free some disk space and "
                            f"resume with resume=auto (the previous file there is intact)") from e
        raise UserError(f"cannot write {path} ({e.strerror or e}); check the folder's permissions "
                        f"or move the run with hydra.run.dir=...") from e
    except BaseException:
        if tmp is not None:
            _remove_quietly(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every file system lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files a killed save left in ``folder``; returns them."""
    removed = []
    if Path(folder).is_dir():
        for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
            _remove_quietly(p)
            removed.append(p)
    return removed


def rng_state() -> dict[str, Any]:
    import numpy as np

    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"key": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any],
                    before_commit: Callable[[Any], None] | None = None) -> None:
    """Serialize in memory first (so a full disk is a plain ``OSError`` from ``write``, not
    an error inside torch's zip writer), then :func:`atomic_write` the bytes."""
    state = {"format": FORMAT, "package_version": __version__, **state}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    atomic_write(Path(path), lambda f: f.write(data), before_commit=before_commit)


def _is_plain(obj: Any, depth: int = 0) -> bool:
    """Nested dicts (string keys) / lists of str, int, float, bool, None."""
    if depth > 32:
        return False
    if isinstance(obj, _PLAIN):
        return True
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in obj)
    return False


def _targets(obj: Any, where: str = "") -> list[tuple[str, Any]]:
    """Every ``_target_`` in a plain config: (dotted key of its node, value)."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "_target_":
                found.append((where, v))
            found.extend(_targets(v, f"{where}.{k}" if where else k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found.extend(_targets(v, f"{where}[{i}]"))
    return found


def check_targets(state: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose config would make ``fewshot eval`` instantiate foreign code.

    Plain data can still name code: eval instantiates the saved config's ``_target_``s. Only
    public names of fewshot_runner's data/backbones/algorithms, at data, backbone and algo (and of
    ``torch.optim`` at optimizer), are accepted (none nested deeper, which Hydra would instantiate recursively).  Resuming does
    not instantiate the saved config, so :func:`load_checkpoint` alone does not check this.
    """
    for where, target in _targets(state["config"]):
        prefix = TARGET_PREFIXES.get(where)
        if (prefix is None or not isinstance(target, str) or not target.startswith(prefix)
                or any(not part.isidentifier() or part.startswith("_") for part in target.split("."))):
            bad = f"{where or '<top>'}._target_={target!r}"[:120]
            raise CheckpointError(f"checkpoint {path} names a foreign class in its config ({bad}) and was refused "
                                  f"for safety; use a checkpoint written by `fewshot train`")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint; every failure is one CheckpointError line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; pass the path of a .pt file written by "
                              f"`fewshot train` (e.g. outputs/<date>/<time>/checkpoints/best.pt)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .pt file inside it "
                              f"(e.g. {path}/checkpoints/best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # weights_only met a reference to code (a class, a function)
            raise CheckpointError(f"checkpoint {path} holds pickled objects other than tensors and plain data and "
                                  f"was refused for safety (weights_only loading); use a checkpoint written by "
                                  f"`fewshot train`") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file; use another checkpoint, "
                              f"e.g. checkpoints/best.pt or last.pt of the run") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, TypeError,
            AttributeError, IndexError):
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (torch cannot read its contents); "
                              f"use another checkpoint, e.g. checkpoints/best.pt or last.pt of the run") from None
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a fewshot checkpoint (missing keys); use a file written by "
                              f"`fewshot train`")
    if state["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state['format']!r}, this fewshot reads format "
                              f"{FORMAT}; use fewshot {state.get('package_version', '?')} to read it")
    if not isinstance(state["config"], dict) or not _is_plain(state["config"]) \
            or not all(isinstance(state["config"].get(k), dict) for k in ("algo", "backbone", "data")):
        raise CheckpointError(f"checkpoint {path} holds no plain-data run config; use a checkpoint written by "
                              f"`fewshot train`")
    if not isinstance(state["model"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise CheckpointError(f"checkpoint {path} holds no model weights (a dict of tensors); use a checkpoint "
                              f"written by `fewshot train`")
    ema = state.get("ema")
    if ema is not None and not (isinstance(ema, dict) and isinstance(ema.get("weights"), dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ema["weights"].items())):
        raise CheckpointError(f"checkpoint {path} has a broken weight average (ema); use a checkpoint written by "
                              f"`fewshot train`")
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        raise CheckpointError(f"checkpoint {path} has an invalid step {state['step']!r}; use a checkpoint "
                              f"written by `fewshot train`")
    return state
