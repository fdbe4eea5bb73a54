"""``run_dir/metrics.jsonl``: one JSON line per :meth:`JSONLLogger.log_metrics` call, always written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from fewshot_runner.loggers.base import NullLogger, to_float


class JSONLLogger(NullLogger):
    """Appends ``{"step": step, **metrics}`` per :meth:`log_metrics` call, one JSON line,
    flushed at once. ``truncate_after_step`` (when resuming): first drop the lines with
    ``step > truncate_after_step`` (and any torn last line), rewriting the file atomically."""

    def __init__(self, path: str | Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            self._truncate(int(truncate_after_step))
        self._f = open(self.path, "a", encoding="utf-8")

    def _truncate(self, last_step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # torn line from a crash mid-write
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] > last_step:
                continue
            kept.append(line)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._f.closed:
            return
        rec = {"step": int(step)}
        rec.update({str(k): to_float(v) for k, v in metrics.items()})
        self._f.write(json.dumps(rec, default=str) + "\n")
        self._f.flush()

    def describe(self) -> str:
        return str(self.path)

    def close(self) -> list[str]:
        if not self._f.closed:
            self._f.close()
        return []
