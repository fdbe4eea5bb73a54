"""Checkpoints: plain data + tensors, written atomically, loaded with ``weights_only=True``.

Format (a dict): format, package_version, config (resolved, plain containers), step,
model, optimizer, scheduler, sampler, rng {python, numpy, torch}, best_val_acc, best_step,
log_window, wall_time.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from fewshot_runner import __version__
from fewshot_runner.errors import CheckpointError, UserError

FORMAT = 1
REQUIRED_KEYS = ("format", "config", "model", "step")


def atomic_write(path: Path, write_fn) -> None:
    """Call ``write_fn(fileobj)`` on a temporary file beside ``path``, fsync, then rename.

    A kill or a full disk during the write leaves any previous ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device while writing {path}; free some disk space "
                            f"(the previous file there is intact)") from e
        raise UserError(f"cannot write {path}: {e.strerror or e}; check the folder's permissions "
                        f"or move the run with hydra.run.dir=...") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    state = {"format": FORMAT, "package_version": __version__, **state}
    atomic_write(Path(path), lambda f: torch.save(state, f))


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
        if "Unsupported global" not in str(e):
            raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({str(e).splitlines()[0][:80]}); "
                                  f"use another checkpoint, e.g. checkpoints/best.pt or last.pt of the run") from e
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data and was "
                              f"refused for safety (weights_only loading); use a checkpoint written by fewshot") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                              f"use another checkpoint, e.g. checkpoints/best.pt or last.pt of the run") from e
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a fewshot checkpoint (missing keys); use a file written by "
                              f"`fewshot train`")
    if state["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state['format']}, this fewshot reads format "
                              f"{FORMAT}; use fewshot {state.get('package_version', '?')} to read it")
    return state
