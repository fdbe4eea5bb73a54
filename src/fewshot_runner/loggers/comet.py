"""Comet: an online experiment (falling back to the offline archive when it cannot start or dies
mid-run) or the offline archive in ``run_dir/comet`` (``comet upload <zip>`` later).

The experiment gets a name, tags, the run info (host, OS, Python, torch, CPU/GPU, git, command
line), the config as parameters, ``config.yaml`` / ``results.json`` as assets, the curves as an
image and, when asked (``logger.log_model=true``), the best checkpoint as a model.  Connection
handling is in :mod:`.comet_connect`.  comet_ml is imported lazily (~1 s).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable

from fewshot_runner.loggers.base import flatten, is_secret_key, redact, to_float
from fewshot_runner.loggers.comet_connect import (
    OnlineFailed,
    api_key,
    bounded_connect_retries,
    end_bounded,
    probe_backend,
    quiet_comet_console,
    safe_end,
    silenced_comet,
    upload_hint,
)

_log = logging.getLogger("fewshot_runner.loggers")

# Keyword arguments shared by Experiment and OfflineExperiment: log only what we log.
COMET_KWARGS = dict(
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
    log_git_metadata=False,  # set_run_info logs branch, commit and dirty flag
    log_git_patch=False,  # can be large, and may hold secrets
    log_env_gpu=True,
    log_env_cpu=True,
    log_env_host=False,  # the IP address among others: not needed to compare runs
    log_env_network=False,
    log_env_disk=False,
    auto_log_co2=False,
    display_summary_level=0,
)


class CometLogger:
    """Comet experiment: ``mode="online"`` (key from ``COMET_API_KEY`` only; falls back to
    an offline archive if it cannot start or dies mid-run) or ``mode="offline"`` (archive in
    ``run_dir/comet``). Never raises from a log call; :meth:`close` returns the messages.
    ``log_model``: whether :meth:`log_model` uploads (``logger.log_model``); off, it does nothing."""

    def __init__(
        self,
        mode: str,
        run_dir: str | Path,
        project_name: str | None = None,
        workspace: str | None = None,
        experiment_name: str | None = None,
        tags: Iterable[str] = (),
        notify: Callable[[str], None] | None = None,
        log_model: bool = False,
    ):
        if mode not in ("online", "offline"):
            raise ValueError(f"CometLogger mode must be 'online' or 'offline', got {mode!r}")
        # comet's crash reporting (sentry) retries a network upload at every run and prints
        # warnings when offline; the user turns it on with COMET_ERROR_TRACKING_ENABLE=true
        os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
        import comet_ml  # lazy: slow import

        self._comet = comet_ml
        quiet_comet_console()
        self.requested_mode = mode
        self.offline_dir = Path(run_dir) / "comet"
        # explicit arguments first, then comet's own env settings
        self.project_name = project_name or os.environ.get("COMET_PROJECT_NAME") or None
        self.workspace = workspace or os.environ.get("COMET_WORKSPACE") or None
        self.experiment_name = experiment_name
        self.tags = list(dict.fromkeys(str(t) for t in tags if str(t)))
        self.log_model_enabled = bool(log_model)
        self._notify = notify or (lambda msg: _log.warning("%s", msg))
        self._secret = api_key()
        self._closed = False
        self._messages: list[str] = []
        self._fallback_reason: str | None = None
        self._fallback_zips: list[str] = []
        self._replay: list[Callable[[Any], None]] = []  # every log call so far, for a switch to offline

        self.exp: Any = None
        self.mode = "disabled"
        if mode == "online":
            try:
                self.exp = self._start_online()
                self.mode = "online"
                url = getattr(self.exp, "url", None)
                if url:
                    self._notify(f"Comet experiment: {url}")
            except OnlineFailed as e:
                self._fallback_reason = str(e)
        if self.exp is None:
            self._start_offline(replay=False)
            if self._fallback_reason and self.mode == "offline":
                self._notify(f"Comet online logging failed ({self._fallback_reason}); logging offline to "
                             f"{self.offline_dir}")

    # -- starting

    def _env_details_safe(self) -> bool:
        # env details include sys.argv ("command"); never ship a key passed on the command line
        return not any(is_secret_key(a) or (self._secret and self._secret in a) for a in sys.argv)

    def _configure(self, exp: Any) -> None:
        if self.experiment_name:
            exp.set_name(self.experiment_name)
        if self.tags:
            exp.add_tags(self.tags)

    def _start_online(self) -> Any:
        key = self._secret
        if not key:
            raise OnlineFailed("COMET_API_KEY is not set")
        reason = probe_backend(self._comet)
        if reason:
            raise OnlineFailed(reason)
        with silenced_comet() as cap, bounded_connect_retries():
            try:
                exp = self._comet.Experiment(
                    api_key=key, project_name=self.project_name, workspace=self.workspace,
                    offline_directory=str(self.offline_dir), log_env_details=self._env_details_safe(),
                    **COMET_KWARGS)
            except Exception as e:
                if type(e).__name__ == "InvalidAPIKey":
                    raise OnlineFailed("invalid COMET_API_KEY") from None
                raise OnlineFailed(redact(f"{type(e).__name__}: {e}", key)) from None
            if not getattr(exp, "alive", False):
                safe_end(exp)
                why = cap.first_error() or "the experiment is not alive after creation"
                raise OnlineFailed(redact(why, key))
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
                workspace=self.workspace, log_env_details=self._env_details_safe(), **COMET_KWARGS)
            self._configure(exp)
            if replay:
                for call in self._replay:
                    call(exp)
            self.exp, self.mode = exp, "offline"
        except Exception as e:
            self.exp, self.mode = None, "disabled"
            msg = f"Comet offline logging failed too ({type(e).__name__}: {e}); only metrics.jsonl is written"
            self._messages.append(redact(msg, self._secret))
            self._notify(self._messages[-1])

    def _switch_to_offline(self, reason: str) -> None:
        old = self.exp
        self.exp = None
        self._fallback_reason = redact(reason, self._secret)
        if old is not None:
            end_bounded(old, 10.0)
        self._start_offline(replay=True)
        if self.mode == "offline":
            self._notify(f"Comet online logging failed mid-run ({self._fallback_reason}); continuing offline in "
                         f"{self.offline_dir}")

    def _call(self, what: str, fn: Callable[[Any], None]) -> None:
        if self._closed:
            return
        self._replay.append(fn)
        if self.exp is None:
            return
        try:
            if self.mode == "online" and not getattr(self.exp, "alive", True):
                raise RuntimeError("the experiment is no longer alive")
            fn(self.exp)
        except Exception as e:
            if self.mode == "online":
                self._switch_to_offline(f"{what}: {type(e).__name__}: {e}")
            else:
                self._messages.append(redact(f"Comet {what} failed: {type(e).__name__}: {e}", self._secret))
                self.exp, self.mode = None, "disabled"

    # -- RunLogger

    def log_params(self, params: dict) -> None:
        flat = {k: redact(v, self._secret) for k, v in flatten(params).items()}
        self._call("log_params", lambda e: e.log_parameters(flat))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        m = {str(k): to_float(v) for k, v in metrics.items()}
        m = {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}  # comet rejects NaN
        if m:
            self._call("log_metrics", lambda e: e.log_metrics(m, step=int(step)))

    def log_image(self, path: str | Path, name: str) -> None:
        p = str(path)
        self._call("log_image", lambda e: e.log_image(p, name=name))

    def log_other(self, key: str, value: Any) -> None:
        if is_secret_key(key):
            return
        value = redact(value, self._secret)
        self._call("log_other", lambda e: e.log_other(key, value))

    def log_asset(self, path: str | Path, name: str | None = None) -> None:
        """A file shown under the experiment's Assets (``config.yaml``, ``results.json``); comet copies it
        at once, so a later change of the file is not seen."""
        p, file_name = str(path), name or Path(path).name
        self._call("log_asset", lambda e: e.log_asset(p, file_name=file_name))

    def log_model(self, name: str, path: str | Path) -> None:
        """The checkpoint as a Comet model (the Models tab, registrable), only with ``log_model=True``."""
        if self.log_model_enabled:
            p = str(path)
            self._call("log_model", lambda e: e.log_model(name, p))

    def set_run_info(self, info: Mapping[str, Any]) -> None:
        """Host, OS, Python, torch, CPU/GPU, git, command line... as Comet "Other" fields (one column each
        in the project table, so runs can be filtered and compared on them)."""
        for k, v in info.items():
            if v is not None:
                self.log_other(str(k), v if isinstance(v, (int, float, bool)) else str(v))

    def describe(self) -> str:
        if self.mode == "online":
            return f"Comet {getattr(self.exp, 'url', None) or 'online'}"
        if self.mode == "offline":
            return f"Comet offline archive in {self.offline_dir}"
        return ""

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
        with silenced_comet() as cap:  # its end() chatter; errors are passed on below
            try:
                exp.end()
            except Exception as e:
                msgs.append(f"Comet end() failed: {type(e).__name__}: {e}")
        for r in cap.records:
            if r.levelno >= logging.ERROR:
                with contextlib.suppress(Exception):
                    msgs.append(f"Comet: {r.getMessage()}")
        msgs = [redact(m, self._secret) for m in msgs]
        if mode == "online":
            if self._fallback_zips:
                z = self._fallback_zips[-1]
                msgs.append(f"Comet lost the server during the run; the experiment was saved offline to {z}; "
                            f"upload later with: {upload_hint(z)}")
            else:
                url = getattr(exp, "url", None)
                msgs.append(f"comet experiment: {url}" if url else "comet experiment logged online")
        else:
            z = self._find_zip(exp)
            if z is None:
                msgs.append(f"Comet offline archive not found in {self.offline_dir}")
            elif self._fallback_reason:
                msgs.append(f"Comet online logging failed ({self._fallback_reason}); logged offline to {z}; "
                            f"upload later with: {upload_hint(z)}")
            else:
                msgs.append(f"comet offline archive: {z}; upload with: {upload_hint(z)}")
        return msgs
