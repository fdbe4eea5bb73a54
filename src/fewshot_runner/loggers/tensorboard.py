"""TensorBoard event files in ``run_dir/tensorboard`` (``logger=tensorboard``; the optional extra
``pip install 'fewshot_runner[tensorboard]'``, or ``pip install tensorboard``).

Metrics as scalars, the curves as an image, the run info, config and results as text, and at the
end the scalar config values with the last ``val/`` and ``test/`` figures in the HParams
dashboard, so runs can be compared side by side: ``tensorboard --logdir multirun/DATE`` (a sweep)
or ``--logdir outputs``.  torch's ``SummaryWriter`` is imported lazily.
"""

from __future__ import annotations

import importlib.util
import math
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewshot_runner.errors import UserError
from fewshot_runner.loggers.base import NullLogger, flatten, to_float

INSTALL_HINT = "pip install tensorboard (or pip install 'fewshot_runner[tensorboard]')"
_TEXT_ASSET_MAX_BYTES = 100_000
_HPARAM_TYPES = (bool, int, float, str)


def tensorboard_missing() -> str | None:
    """The one-line reason ``logger=tensorboard`` cannot run here, or None (cheap: no import)."""
    if importlib.util.find_spec("tensorboard") is None:
        return f"logger=tensorboard needs the tensorboard package, which is not installed: {INSTALL_HINT}"
    return None


class TensorBoardLogger(NullLogger):
    """``truncate_after_step`` (a resumed run): events after that step from the first attempt are
    hidden (SummaryWriter's ``purge_step``), as metrics.jsonl is cut back."""

    def __init__(self, run_dir: str | Path, truncate_after_step: int | None = None,
                 experiment_name: str | None = None, tags: tuple[str, ...] | list[str] = ()):
        missing = tensorboard_missing()
        if missing:
            raise UserError(missing)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        purge = int(truncate_after_step) + 1 if truncate_after_step else None
        self._w = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        self._hparams: dict[str, Any] = {}
        self._last: dict[str, float] = {}
        self._closed = False
        head = [f"**{experiment_name}**"] if experiment_name else []
        if tags:
            head.append("tags: " + ", ".join(f"`{t}`" for t in tags))
        if head:
            self._w.add_text("run/name", "  \n".join(head), 0)

    def log_params(self, params: dict) -> None:
        flat = flatten(params)
        self._hparams.update({k: v if isinstance(v, _HPARAM_TYPES) or v is None else str(v) for k, v in flat.items()})
        rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in flat.items())
        self._write_text("run/config", f"| key | value |\n|---|---|\n{rows}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._closed:
            return
        for k, v in metrics.items():
            v = to_float(v)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._w.add_scalar(str(k), v, int(step))
                self._last[str(k)] = float(v)

    def log_image(self, path: str | Path, name: str) -> None:
        if self._closed:
            return
        try:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            self._w.add_image(name, arr, dataformats="HWC")
        except Exception:  # noqa: BLE001 - a picture must never stop a run
            pass

    def log_other(self, key: str, value: Any) -> None:
        self._write_text(f"other/{key}", _cell(value))

    def log_asset(self, path: str | Path, name: str | None = None) -> None:
        """Small text files (config.yaml, results.json) in the Text tab; others are not copied."""
        p = Path(path)
        try:
            if p.stat().st_size <= _TEXT_ASSET_MAX_BYTES:
                text = p.read_text(encoding="utf-8")
                self._write_text(f"files/{name or p.name}", "    " + text.replace("\n", "\n    "))
        except (OSError, UnicodeDecodeError):
            pass

    def set_run_info(self, info: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in info.items() if v is not None)
        self._write_text("run/info", f"| | |\n|---|---|\n{rows}")

    def _write_text(self, tag: str, text: str) -> None:
        if not self._closed:
            self._w.add_text(tag, text, 0)

    def describe(self) -> str:
        return f"TensorBoard events in {self.log_dir}"

    def close(self) -> list[str]:
        if self._closed:
            return []
        self._closed = True
        final = {f"hparam/{k}": v for k, v in self._last.items() if k.startswith(("val/", "test/"))}
        if self._hparams and final:
            try:
                self._w.add_hparams(self._hparams, final, run_name=".")  # into this run's own folder
            except Exception:  # noqa: BLE001 - a value TensorBoard refuses must not fail the run's end
                pass
        self._w.close()
        return [f"tensorboard: tensorboard --logdir {shlex.quote(str(self.log_dir))}"]


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")
