"""What every run logger offers (:class:`RunLogger`), the fan-out (:class:`MultiLogger`) and the
small helpers the loggers share.  No torch, no comet_ml here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

_SECRET_KEY = re.compile(r"api[_\-]?key", re.IGNORECASE)


@runtime_checkable
class RunLogger(Protocol):
    """The calls the engine makes, in this order:

    ``set_run_info(info)`` (done by :func:`~fewshot_runner.loggers.make_run_logger`), ``log_params``,
    ``log_asset(config.yaml)``, then ``log_metrics`` / ``log_other`` during training, and at the end
    ``log_asset(results.json)``, ``log_image(curves.png)``, ``log_model("best", best.pt)``, ``close()``.
    A logger never raises from a log call; ``close()`` returns the lines to show the user."""

    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, path: str | Path, name: str) -> None: ...

    def log_other(self, key: str, value: Any) -> None: ...

    def log_asset(self, path: str | Path, name: str | None = None) -> None: ...

    def log_model(self, name: str, path: str | Path) -> None: ...

    def set_run_info(self, info: Mapping[str, Any]) -> None: ...

    def describe(self) -> str: ...

    def close(self) -> list[str]: ...


class NullLogger:
    """Every call a no-op: the base of loggers that handle only some calls."""

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, path: str | Path, name: str) -> None:
        pass

    def log_other(self, key: str, value: Any) -> None:
        pass

    def log_asset(self, path: str | Path, name: str | None = None) -> None:
        pass

    def log_model(self, name: str, path: str | Path) -> None:
        pass

    def set_run_info(self, info: Mapping[str, Any]) -> None:
        pass

    def describe(self) -> str:
        return ""

    def close(self) -> list[str]:
        return []


class MultiLogger:
    """Fans every call out to several loggers; :meth:`close` concatenates their messages."""

    def __init__(self, *loggers: RunLogger):
        self.loggers = list(loggers)

    def _each(self, method: str, *args: Any) -> None:
        for lg in self.loggers:
            fn = getattr(lg, method, None)  # a user's own logger may implement only the first five calls
            if fn is not None:
                fn(*args)

    def log_params(self, params: dict) -> None:
        self._each("log_params", params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def log_image(self, path: str | Path, name: str) -> None:
        self._each("log_image", path, name)

    def log_other(self, key: str, value: Any) -> None:
        self._each("log_other", key, value)

    def log_asset(self, path: str | Path, name: str | None = None) -> None:
        if Path(path).is_file():
            self._each("log_asset", path, name)

    def log_model(self, name: str, path: str | Path) -> None:
        if Path(path).is_file():
            self._each("log_model", name, path)

    def set_run_info(self, info: Mapping[str, Any]) -> None:
        self._each("set_run_info", info)

    def describe(self) -> str:
        """Where the run's logs go, for the start-of-run banner: ``metrics.jsonl; Comet offline ...``."""
        parts = [d for d in (getattr(lg, "describe", lambda: "")() for lg in self.loggers) if d]
        return "; ".join(parts)

    def close(self) -> list[str]:
        out: list[str] = []
        for lg in self.loggers:
            out.extend(lg.close())
        return out

    def __enter__(self) -> "MultiLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": v}``; keys containing ``api_key`` (any case, also
    ``apikey``/``api-key``) are dropped, with their whole subtree."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if _SECRET_KEY.search(str(k)):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def to_float(v: Any) -> Any:
    """Scalars (python, numpy, 0-d tensors via .item()) -> float; others unchanged."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return v
    item = getattr(v, "item", None)
    if callable(item):
        try:
            return item()
        except Exception:
            pass
    try:
        return float(v)
    except Exception:
        return v


def redact(value: Any, secret: str) -> Any:
    if secret and isinstance(value, str) and secret in value:
        return value.replace(secret, "***")
    return value


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(str(key)))
