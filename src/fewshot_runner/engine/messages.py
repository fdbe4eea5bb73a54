"""Plain message lines and small file writes shared by the training and evaluation recipes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.engine.console import console


def say(msg: str, err: bool = False) -> None:
    """One plain message line (no markup, no wrapping: paths and commands stay copyable)."""
    if err:
        print(msg, file=sys.stderr, flush=True)
    else:
        console.print(msg, markup=False, highlight=False, soft_wrap=True)


def clock(seconds: float) -> str:
    """Elapsed time as H:MM:SS."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as indented JSON, written atomically."""
    ckpt.atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
