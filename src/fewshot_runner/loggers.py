"""Run loggers: metrics.jsonl always, plus Comet (online, or its offline archive).

``make_logger(kind, run_dir)`` returns a :class:`MultiLogger` that always writes
``run_dir/metrics.jsonl`` and, for the Comet kinds, a :class:`CometLogger`.

Comet notes (comet_ml 3.58.8, read from its source):

* ``Experiment.alive`` is a plain bool attribute, set from ``_setup_streamer()`` in
  ``_start()``. With a key but no server it is ``False`` after the constructor and every
  ``log_*`` call is a silent no-op (no offline copy), so :class:`CometLogger` checks it
  and falls back to an ``OfflineExperiment`` itself.
* The ~30 s block is urllib3 retry back-off, not a socket timeout: the backend version
  check (``comet.http_session.retry_total`` = 3, ``retry_backoff_factor`` = 2, ~12 s)
  and the experiment creation (``comet.get_or_add_experiment.retry_*``: 4 connect / 10
  total retries, back-off up to 12 s, ~18 s). Each is an env setting
  (``COMET_HTTP_SESSION_RETRY_TOTAL``, ``COMET_GET_OR_ADD_EXPERIMENT_RETRY_TOTAL`` ...),
  re-read by comet on every ``get_config()``. While creating the experiment we lower them
  to 1 retry (only those the user has not set) and restore them afterwards, so the
  runtime keeps comet's defaults. The per-request socket timeout is ``COMET_TIMEOUT_HTTP``
  (10 s; kept, since the connection keeps it for the whole run). A 3 s TCP probe of the
  backend first (skipped behind a proxy) bounds the "packets dropped" case too. With DNS
  failing (this sandbox) the fallback takes well under a second instead of ~31 s.
* An online experiment that loses the server mid-run is handled by comet's own
  ``FallbackStreamer``, which writes an offline zip at ``end()``; we catch its path with
  ``set_offline_zip_uploader``. A ``log_*`` call that raises, or ``alive`` turning False,
  switches us to a fresh ``OfflineExperiment`` replaying everything logged so far.
* Setting ``COMET_LOGGING_CONSOLE`` also turns on full tracebacks in comet's console
  formatter, so instead we raise the level of comet's console handler to WARNING with the
  logging API (unless the user set ``COMET_LOGGING_CONSOLE``).

This module must stay importable without torch, and imports comet_ml lazily (~1 s).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import shlex
import socket
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable
from urllib.parse import urlsplit

__all__ = ["RunLogger", "JSONLLogger", "CometLogger", "MultiLogger", "make_logger", "flatten"]

_log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"api[_\-]?key", re.IGNORECASE)

# Lowered only while the online experiment is being created (see module docstring).
_CONNECT_RETRY_ENV = {
    "COMET_HTTP_SESSION_RETRY_TOTAL": "1",
    "COMET_HTTP_SESSION_RETRY_BACKOFF_FACTOR": "1",
    "COMET_GET_OR_ADD_EXPERIMENT_RETRY_TOTAL": "1",
    "COMET_GET_OR_ADD_EXPERIMENT_RETRY_CONNECT": "1",
    "COMET_GET_OR_ADD_EXPERIMENT_RETRY_READ": "1",
    "COMET_GET_OR_ADD_EXPERIMENT_RETRY_STATUS": "1",
    "COMET_GET_OR_ADD_EXPERIMENT_RETRY_BACKOFF_MAX": "2",
}
_PROBE_TIMEOUT_S = 3.0

# Keyword arguments shared by Experiment and OfflineExperiment: log only what we log.
_COMET_KWARGS = dict(
    log_code=False,
    log_graph=False,
    auto_param_logging=False,
    auto_metric_logging=False,
    auto_histogram_weight_logging=False,
    auto_histogram_gradient_logging=False,
    auto_histogram_activation_logging=False,
    auto_histogram_tensorboard_logging=False,
    parse_args=False,
    auto_output_logging=False,  # no stdout/stderr capture
    log_git_metadata=False,  # the caller logs the commit with log_other
    log_git_patch=False,  # can be large, and may hold secrets
    log_env_gpu=True,
    log_env_cpu=True,
    log_env_host=False,
    log_env_network=False,
    log_env_disk=False,
    auto_log_co2=False,
    display_summary_level=0,
)


@runtime_checkable
class RunLogger(Protocol):
    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, path: str | Path, name: str) -> None: ...

    def log_other(self, key: str, value: Any) -> None: ...

    def close(self) -> list[str]: ...


# --------------------------------------------------------------------------- helpers


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


def _to_float(v: Any) -> Any:
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


def _api_key() -> str:
    return os.environ.get("COMET_API_KEY", "").strip()


def _redact(value: Any, secret: str) -> Any:
    if secret and isinstance(value, str) and secret in value:
        return value.replace(secret, "***")
    return value


def _upload_hint(zip_path: str) -> str:
    return f"comet upload {shlex.quote(zip_path)}"


# --------------------------------------------------------------------------- JSONL


class JSONLLogger:
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

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._f.closed:
            return
        rec = {"step": int(step)}
        rec.update({str(k): _to_float(v) for k, v in metrics.items()})
        self._f.write(json.dumps(rec, default=str) + "\n")
        self._f.flush()

    def log_image(self, path: str | Path, name: str) -> None:
        pass

    def log_other(self, key: str, value: Any) -> None:
        pass

    def close(self) -> list[str]:
        if not self._f.closed:
            self._f.close()
        return []


# --------------------------------------------------------------------------- Comet


class _OnlineFailed(Exception):
    pass


class _Capture(logging.Handler):
    """Collects comet's WARNING+ records (message text only) during a quiet section."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def first_error(self) -> str | None:
        for level in (logging.ERROR, logging.WARNING):
            for r in self.records:
                if r.levelno >= level:
                    with contextlib.suppress(Exception):
                        return r.getMessage().split(". ")[0].strip()
        return None


def _console_handlers(lg: logging.Logger) -> list[logging.Handler]:
    return [h for h in lg.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


class _DropAutoLoggingHint(logging.Filter):
    """Comet's "import comet_ml before torch" hint: fewshot logs everything explicitly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("To get all data logged automatically")


def _quiet_comet_console() -> None:
    """Comet's console to WARNING (it logs INFO chatter by default), unless the user set
    COMET_LOGGING_CONSOLE."""
    if os.environ.get("COMET_LOGGING_CONSOLE"):
        return
    lg = logging.getLogger("comet_ml")
    if not any(isinstance(f, _DropAutoLoggingHint) for f in lg.filters):
        for name in ("comet_ml", "comet_ml.experiment"):
            logging.getLogger(name).addFilter(_DropAutoLoggingHint())
    for h in _console_handlers(lg):
        if h.level < logging.WARNING:
            h.setLevel(logging.WARNING)


@contextlib.contextmanager
def _silenced_comet():
    """Mute comet's console (it prints tracebacks for a failed connection) and capture."""
    lg = logging.getLogger("comet_ml")
    saved = [(h, h.level) for h in _console_handlers(lg)]
    for h, _ in saved:
        h.setLevel(logging.CRITICAL + 1)
    cap = _Capture()
    lg.addHandler(cap)
    try:
        yield cap
    finally:
        lg.removeHandler(cap)
        for h, level in saved:
            h.setLevel(level)


@contextlib.contextmanager
def _bounded_connect_retries():
    added = [k for k in _CONNECT_RETRY_ENV if k not in os.environ]
    for k in added:
        os.environ[k] = _CONNECT_RETRY_ENV[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _probe_backend(comet_ml: Any) -> str | None:
    """A short TCP connect to comet's server: the reason it is unreachable, or None.
    Skipped (None) behind an HTTP(S) proxy, where a direct connect proves nothing."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        url = comet_ml.config.get_backend_address(comet_ml.config.get_config())
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except Exception:
        return None
    if not host:
        return None
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            return None
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror or e}"
    except OSError as e:
        return f"cannot connect to {host}:{port}: {getattr(e, 'strerror', None) or e or type(e).__name__}"


def _end_bounded(exp: Any, timeout_s: float) -> None:
    """exp.end() in a daemon thread; give up waiting after timeout_s (a broken online
    experiment may wait long for its server)."""
    t = threading.Thread(target=_safe_end, args=(exp,), daemon=True)
    t.start()
    t.join(timeout_s)


def _safe_end(exp: Any) -> None:
    try:
        exp.end()
    except Exception:
        _log.debug("comet end() failed", exc_info=True)


class CometLogger:
    """Comet experiment: ``mode="online"`` (key from ``COMET_API_KEY`` only; falls back to
    an offline archive if it cannot start or dies mid-run) or ``mode="offline"`` (archive in
    ``run_dir/comet``). Never raises from a log call; :meth:`close` returns the messages."""

    def __init__(
        self,
        mode: str,
        run_dir: str | Path,
        project_name: str | None = None,
        workspace: str | None = None,
        experiment_name: str | None = None,
        tags: Iterable[str] = (),
        notify: Callable[[str], None] | None = None,
    ):
        if mode not in ("online", "offline"):
            raise ValueError(f"CometLogger mode must be 'online' or 'offline', got {mode!r}")
        # comet's crash reporting (sentry) retries a network upload at every run and prints
        # warnings when offline; the user turns it on with COMET_ERROR_TRACKING_ENABLE=true
        os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
        import comet_ml  # lazy: slow import

        self._comet = comet_ml
        _quiet_comet_console()
        self.requested_mode = mode
        self.offline_dir = Path(run_dir) / "comet"
        # explicit arguments first, then comet's own env settings
        self.project_name = project_name or os.environ.get("COMET_PROJECT_NAME") or None
        self.workspace = workspace or os.environ.get("COMET_WORKSPACE") or None
        self.experiment_name = experiment_name
        self.tags = [str(t) for t in tags]
        self._notify = notify or (lambda msg: _log.warning("%s", msg))
        self._secret = _api_key()
        self._closed = False
        self._messages: list[str] = []
        self._fallback_reason: str | None = None
        self._fallback_zips: list[str] = []
        # replay buffer, for a switch to offline mid-run
        self._params: dict[str, Any] = {}
        self._others: dict[str, Any] = {}
        self._metrics: list[tuple[dict[str, Any], int]] = []
        self._images: list[tuple[str, str]] = []

        self.exp: Any = None
        self.mode = "disabled"
        if mode == "online":
            try:
                self.exp = self._start_online()
                self.mode = "online"
                url = getattr(self.exp, "url", None)
                if url:
                    self._notify(f"Comet experiment: {url}")
            except _OnlineFailed as e:
                self._fallback_reason = str(e)
        if self.exp is None:
            self._start_offline(replay=False)
            if self._fallback_reason and self.mode == "offline":
                self._notify(f"Comet online logging failed ({self._fallback_reason}); logging offline to "
                             f"{self.offline_dir}")

    # -- starting

    def _env_details_safe(self) -> bool:
        # env details include sys.argv ("command"); never ship a key passed on the command line
        return not any(_SECRET_KEY.search(a) or (self._secret and self._secret in a) for a in sys.argv)

    def _configure(self, exp: Any) -> None:
        if self.experiment_name:
            exp.set_name(self.experiment_name)
        if self.tags:
            exp.add_tags(self.tags)

    def _start_online(self) -> Any:
        key = self._secret
        if not key:
            raise _OnlineFailed("COMET_API_KEY is not set")
        reason = _probe_backend(self._comet)
        if reason:
            raise _OnlineFailed(reason)
        with _silenced_comet() as cap, _bounded_connect_retries():
            try:
                exp = self._comet.Experiment(
                    api_key=key, project_name=self.project_name, workspace=self.workspace,
                    offline_directory=str(self.offline_dir), log_env_details=self._env_details_safe(),
                    **_COMET_KWARGS)
            except Exception as e:
                if type(e).__name__ == "InvalidAPIKey":
                    raise _OnlineFailed("invalid COMET_API_KEY") from None
                raise _OnlineFailed(_redact(f"{type(e).__name__}: {e}", key)) from None
            if not getattr(exp, "alive", False):
                _safe_end(exp)
                why = cap.first_error() or "the experiment is not alive after creation"
                raise _OnlineFailed(_redact(why, key))
        self.offline_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):
            exp.set_offline_zip_uploader(self._fallback_zips.append)  # comet's own mid-run fallback
        self._configure(exp)
        return exp

    def _start_offline(self, replay: bool) -> None:
        try:
            self.offline_dir.mkdir(parents=True, exist_ok=True)
            exp = self._comet.OfflineExperiment(
                offline_directory=str(self.offline_dir), project_name=self.project_name,
                workspace=self.workspace, log_env_details=self._env_details_safe(), **_COMET_KWARGS)
            self._configure(exp)
            if replay:
                if self._params:
                    exp.log_parameters(self._params)
                for k, v in self._others.items():
                    exp.log_other(k, v)
                for m, s in self._metrics:
                    exp.log_metrics(m, step=s)
                for p, n in self._images:
                    exp.log_image(p, name=n)
            self.exp, self.mode = exp, "offline"
        except Exception as e:
            self.exp, self.mode = None, "disabled"
            msg = f"Comet offline logging failed too ({type(e).__name__}: {e}); only metrics.jsonl is written"
            self._messages.append(_redact(msg, self._secret))
            self._notify(self._messages[-1])

    def _switch_to_offline(self, reason: str) -> None:
        old = self.exp
        self.exp = None
        self._fallback_reason = _redact(reason, self._secret)
        if old is not None:
            _end_bounded(old, 10.0)
        self._start_offline(replay=True)
        if self.mode == "offline":
            self._notify(f"Comet online logging failed mid-run ({self._fallback_reason}); continuing offline in "
                         f"{self.offline_dir}")

    def _call(self, what: str, fn: Callable[[Any], None]) -> None:
        if self._closed or self.exp is None:
            return
        try:
            if self.mode == "online" and not getattr(self.exp, "alive", True):
                raise RuntimeError("the experiment is no longer alive")
            fn(self.exp)
        except Exception as e:
            if self.mode == "online":
                self._switch_to_offline(f"{what}: {type(e).__name__}: {e}")
            else:
                self._messages.append(_redact(f"Comet {what} failed: {type(e).__name__}: {e}", self._secret))
                self.exp, self.mode = None, "disabled"

    # -- RunLogger

    def log_params(self, params: dict) -> None:
        flat = {k: _redact(v, self._secret) for k, v in flatten(params).items()}
        self._params.update(flat)
        self._call("log_params", lambda e: e.log_parameters(flat))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        m = {str(k): _to_float(v) for k, v in metrics.items()}
        m = {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}  # comet rejects NaN
        if not m:
            return
        self._metrics.append((m, int(step)))
        self._call("log_metrics", lambda e: e.log_metrics(m, step=int(step)))

    def log_image(self, path: str | Path, name: str) -> None:
        p = str(path)
        self._images.append((p, name))
        self._call("log_image", lambda e: e.log_image(p, name=name))

    def log_other(self, key: str, value: Any) -> None:
        if _SECRET_KEY.search(str(key)):
            return
        value = _redact(value, self._secret)
        self._others[key] = value
        self._call("log_other", lambda e: e.log_other(key, value))

    def _find_zip(self, exp: Any) -> str | None:
        with contextlib.suppress(Exception):
            key = exp.get_key()
            hits = sorted(glob.glob(str(self.offline_dir / f"{glob.escape(key)}*.zip")), key=os.path.getmtime)
            if hits:
                return hits[-1]
        return None

    def close(self) -> list[str]:
        if self._closed:
            return []
        self._closed = True
        exp, mode = self.exp, self.mode
        msgs = list(self._messages)
        if exp is None:
            return msgs
        with _silenced_comet() as cap:  # its end() chatter; errors are passed on below
            try:
                exp.end()
            except Exception as e:
                msgs.append(f"Comet end() failed: {type(e).__name__}: {e}")
        for r in cap.records:
            if r.levelno >= logging.ERROR:
                with contextlib.suppress(Exception):
                    msgs.append(f"Comet: {r.getMessage()}")
        msgs = [_redact(m, self._secret) for m in msgs]
        if mode == "online":
            if self._fallback_zips:
                z = self._fallback_zips[-1]
                msgs.append(f"Comet lost the server during the run; the experiment was saved offline to {z}; "
                            f"upload later with: {_upload_hint(z)}")
            else:
                url = getattr(exp, "url", None)
                msgs.append(f"comet experiment: {url}" if url else "comet experiment logged online")
        else:
            z = self._find_zip(exp)
            if z is None:
                msgs.append(f"Comet offline archive not found in {self.offline_dir}")
            elif self._fallback_reason:
                msgs.append(f"Comet online logging failed ({self._fallback_reason}); logged offline to {z}; "
                            f"upload later with: {_upload_hint(z)}")
            else:
                msgs.append(f"comet offline archive: {z}; upload with: {_upload_hint(z)}")
        return msgs


# --------------------------------------------------------------------------- fan-out


class MultiLogger:
    """Fans every call out to several loggers; :meth:`close` concatenates their messages."""

    def __init__(self, *loggers: RunLogger):
        self.loggers = list(loggers)

    def log_params(self, params: dict) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_image(self, path: str | Path, name: str) -> None:
        for lg in self.loggers:
            lg.log_image(path, name)

    def log_other(self, key: str, value: Any) -> None:
        for lg in self.loggers:
            lg.log_other(key, value)

    def close(self) -> list[str]:
        out: list[str] = []
        for lg in self.loggers:
            out.extend(lg.close())
        return out

    def __enter__(self) -> "MultiLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


KINDS = ("auto", "comet", "comet_offline", "none")


def make_logger(
    kind: str,
    run_dir: str | Path,
    *,
    project_name: str | None = None,
    workspace: str | None = None,
    experiment_name: str | None = None,
    tags: Iterable[str] = (),
    console: Any = None,
    truncate_after_step: int | None = None,
) -> MultiLogger:
    """``run_dir/metrics.jsonl`` plus, by ``kind``: ``auto`` (Comet online if COMET_API_KEY
    is set, else offline), ``comet`` (online, falling back to offline), ``comet_offline``,
    ``none``. ``console`` (a rich Console or anything with ``print``) shows notices at once."""
    if kind not in KINDS:
        raise ValueError(f"unknown logger kind {kind!r}; choose one of {', '.join(KINDS)}")
    run_dir = Path(run_dir)
    loggers: list[RunLogger] = [JSONLLogger(run_dir / "metrics.jsonl", truncate_after_step=truncate_after_step)]
    if kind == "none":
        return MultiLogger(*loggers)
    mode = "offline" if kind == "comet_offline" or (kind == "auto" and not _api_key()) else "online"

    def notify(msg: str) -> None:
        if console is not None:
            try:
                console.print(msg, markup=False, highlight=False)
            except TypeError:
                console.print(msg)
        else:
            _log.warning("%s", msg)

    try:
        loggers.append(CometLogger(mode, run_dir, project_name=project_name, workspace=workspace,
                                   experiment_name=experiment_name, tags=tags, notify=notify))
    except ImportError as e:
        notify(f"comet_ml is not importable ({e}); logging to {run_dir / 'metrics.jsonl'} only")
    return MultiLogger(*loggers)
