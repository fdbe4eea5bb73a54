"""Starting and stopping Comet experiments without a network hanging the run (comet_ml 3.58.8).

Read from comet_ml's source:

* ``Experiment.alive`` is a plain bool attribute, set from ``_setup_streamer()`` in
  ``_start()``. With a key but no server it is ``False`` after the constructor and every
  ``log_*`` call is a silent no-op (no offline copy), so :class:`~.comet.CometLogger` checks it
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
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

_log = logging.getLogger("fewshot_runner.loggers")

# Lowered only while the online experiment is being created (see the module docstring).
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


def api_key() -> str:
    return os.environ.get("COMET_API_KEY", "").strip()


def upload_hint(zip_path: str) -> str:
    return f"comet upload {shlex.quote(zip_path)}"


class OnlineFailed(Exception):
    pass


class Capture(logging.Handler):
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


def quiet_comet_console() -> None:
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
def silenced_comet():
    """Mute comet's console (it prints tracebacks for a failed connection) and capture."""
    lg = logging.getLogger("comet_ml")
    saved = [(h, h.level) for h in _console_handlers(lg)]
    for h, _ in saved:
        h.setLevel(logging.CRITICAL + 1)
    cap = Capture()
    lg.addHandler(cap)
    try:
        yield cap
    finally:
        lg.removeHandler(cap)
        for h, level in saved:
            h.setLevel(level)


@contextlib.contextmanager
def bounded_connect_retries():
    added = [k for k in _CONNECT_RETRY_ENV if k not in os.environ]
    for k in added:
        os.environ[k] = _CONNECT_RETRY_ENV[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def probe_backend(comet_ml: Any) -> str | None:
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


def end_bounded(exp: Any, timeout_s: float) -> None:
    """exp.end() in a daemon thread; give up waiting after timeout_s (a broken online
    experiment may wait long for its server)."""
    t = threading.Thread(target=safe_end, args=(exp,), daemon=True)
    t.start()
    t.join(timeout_s)


def safe_end(exp: Any) -> None:
    try:
        exp.end()
    except Exception:
        _log.debug("comet end() failed", exc_info=True)
